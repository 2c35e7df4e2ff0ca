//! MLA.
