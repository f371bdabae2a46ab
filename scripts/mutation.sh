#!/usr/bin/env bash
# Mutation testing of the modules where a silent error costs most, one module at a time, against their fast tests
# (the configuration is [tool.mutmut] in pyproject.toml; the surviving mutants and why each is harmless are in
# tests/MUTATION.md). Too slow for CI: run it by hand after changing one of these modules or its tests.
#
#   scripts/mutation.sh                      # every module, then the score table
#   scripts/mutation.sh cnnrun.layout        # one module
#   MUTATION_JOBS=1 scripts/mutation.sh      # fewer parallel test processes (default 2)
#
# Afterwards: `mutmut results` lists the survivors, `mutmut show NAME` shows one as a diff.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"  # mutmut puts mutants/ ahead of this, so the tests import the mutated copy
if [ -z "${PYTHON:-}" ]; then  # the project's venv (scripts/install.sh) if there is one, else the active python
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
MODULES=(cnnrun.layout cnnrun.spec.shapes cnnrun.checkpoint cnnrun.resume cnnrun.spec.compiler cnnrun.trainer
         cnnrun.data.feed cnnrun.data.pipeline)
if [ "$#" -gt 0 ]; then MODULES=("$@"); fi
mkdir -p mutants
for module in "${MODULES[@]}"; do
    echo "== $module"
    # Naming the mutants makes mutmut test them again even when it has a result from an earlier run.
    log="mutants/$module.log"
    if ! "$PYTHON" -m mutmut run --max-children "${MUTATION_JOBS:-2}" "$module.*" >"$log" 2>&1; then
        tail -n 30 "$log"
        exit 1
    fi
    grep -E '^(🙁|🫥|🤔)' "$log" || true  # the survivors, the mutants no test reaches, the suspicious
done
"$PYTHON" scripts/mutation_score.py
