#!/usr/bin/env bash
# Checks that a change to the CUDA sources leaves the machine code as it was, without a GPU:
# compiles every crates/fla-kernels/cuda/*.cu at REV (default HEAD) and in the working tree to
# sm_90a cubins and compares the .text section of every kernel. Use it for refactors of device
# code (moving helpers, renaming, folding loops); a kernel reported DIFFERENT needs a GPU run.
#   scripts/cubin-diff.sh [REV]
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:-HEAD}"
nvcc="${FLA_NVCC:-.cuda/nvidia/cu13/bin/nvcc}"
[ -x "$nvcc" ] || { echo "no nvcc at $nvcc: run scripts/install-nvcc.sh" >&2; exit 1; }
nvcc="$(realpath "$nvcc")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/old" "$tmp/new"
git archive "$rev" crates/fla-kernels/cuda | tar -x -C "$tmp/old"
cp -r crates/fla-kernels/cuda "$tmp/new/"
build() { (cd "$1" && "$nvcc" -gencode=arch=compute_90a,code=sm_90a -cubin -O3 -std=c++17 -I . -o "$2" "$3"); }
for f in crates/fla-kernels/cuda/*.cu; do
  b="$(basename "$f" .cu)"
  if [ -f "$tmp/old/crates/fla-kernels/cuda/$b.cu" ]; then
    build "$tmp/old/crates/fla-kernels/cuda" "$tmp/$b.old.cubin" "$b.cu" &
  fi
  build "$tmp/new/cuda" "$tmp/$b.new.cubin" "$b.cu" &
  wait
done
python3 - "$tmp" <<'PY'
import glob, os, struct, sys

def texts(path):
    """The .text.<kernel> sections of an ELF64 cubin."""
    b = open(path, "rb").read()
    shoff = struct.unpack_from("<Q", b, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    out = {}
    for h in hdrs:
        name = b[names + h[0]: b.index(b"\0", names + h[0])].decode()
        if name.startswith(".text."):
            out[name[6:]] = b[h[4]: h[4] + h[5]]
    return out

tmp = sys.argv[1]
for new in sorted(glob.glob(os.path.join(tmp, "*.new.cubin"))):
    module = os.path.basename(new).split(".")[0]
    old = new.replace(".new.", ".old.")
    if not os.path.exists(old):
        print(f"{module}: new module")
        continue
    a, c = texts(old), texts(new)
    diff = sorted(k for k in a.keys() | c.keys() if a.get(k) != c.get(k))
    print(f"{module}: {len(c)} kernels, " + ("machine code identical" if not diff else "DIFFERENT: " + ", ".join(diff)))
PY
