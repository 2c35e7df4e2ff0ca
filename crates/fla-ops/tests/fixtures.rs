//! The float64 kernel fixtures made by the Python reference (`../shared/fixtures/kernels`): every
//! form (naive, chunk forward + backward, recurrent) of every fixture within
//! [`fla_ops::verify::TOLERANCE`] of the stored outputs and gradients.
use std::path::{Path, PathBuf};

use fla_ops::verify::{verify_fixture, TOLERANCE};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/kernels")
}

fn fixtures() -> Vec<PathBuf> {
    let dir = fixture_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_fixture_passes_every_form() {
    let paths = fixtures();
    assert!(paths.len() >= 7, "expected at least 7 fixtures in {}, found {}", fixture_dir().display(), paths.len());
    let mut failures = Vec::new();
    let mut families = std::collections::BTreeSet::new();
    for path in &paths {
        let reports = verify_fixture(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let forms: Vec<&str> = reports.iter().map(|r| r.form).collect();
        assert!(reports.len() >= 3, "{}: only forms {forms:?} ran", path.display());
        for form in ["naive", "chunk", "recurrent"] {
            assert!(forms.contains(&form), "{}: no {form} form", path.display());
        }
        for r in &reports {
            families.insert(r.family.name());
            // Every form compares o and the final state; chunk compares gradients too.
            assert!(
                r.errors.contains_key("o") && r.errors.contains_key("ht"),
                "{}: {} compared {:?}",
                r.fixture,
                r.form,
                r.errors.keys()
            );
            if r.form == "chunk" {
                for g in ["dq", "dk", "dv", "dh0"] {
                    assert!(r.errors.contains_key(g), "{}: chunk did not compare {g}", r.fixture);
                }
            }
            if !r.passed() {
                failures.push(r.to_json());
            }
            for (name, &e) in &r.errors {
                assert!(
                    e.is_finite() && e <= TOLERANCE || !r.passed(),
                    "{}: {name} = {e} but the report passed",
                    r.fixture
                );
            }
        }
    }
    assert!(failures.is_empty(), "failing fixture forms:\n{}", failures.join("\n"));
    assert!(families.len() >= 5, "fixtures cover only the families {families:?}");
}
