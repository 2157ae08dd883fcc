#!/usr/bin/env bash
# The study's invariants (docs/statistics.md, "Mutations and the tests that kill them"): apply each
# mutation in a throw-away worktree of HEAD, run the test that must kill it, revert. Prints
# "killed" or "SURVIVED" per mutation; exits 1 if any survived.
#   bash experiments/mutations/run.sh        (about 1 min on 2 cores)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYBIN=${PYBIN:-$ROOT/.venv/bin/python}
WT=$(mktemp -d /tmp/lung_cls_mut.XXXXXX)
git -C "$ROOT" worktree add -q --detach "$WT" HEAD
trap 'git -C "$ROOT" worktree remove --force "$WT"' EXIT
cd "$WT"
PY="env PYTHONPATH=$WT $PYBIN -m pytest -q -x -p no:cacheprovider"
survived=0
# First the tests themselves must pass on the unmutated code.
$PY tests/data/test_invariants.py tests/evaluation/test_stats.py tests/report/test_report_cams.py \
    tests/evaluation/test_cam.py::test_run_artifacts_explain_the_true_class_and_keep_raw_cams \
    >/tmp/mut.out 2>&1 || { echo "the guarding tests fail without any mutation:"; tail -5 /tmp/mut.out; exit 1; }
run() {  # file, python-replace (old, new), test id
  local f=$1 old=$2 new=$3 t=$4
  python3 - "$f" "$old" "$new" <<'PY'
import sys; p,o,n=sys.argv[1:4]; s=open(p).read(); assert o in s, (p,o); open(p,'w').write(s.replace(o,n,1))
PY
  if $PY "$t" >/tmp/mut.out 2>&1; then
    echo "SURVIVED: $f: $old -> $new  ($t)"; survived=1
  else
    echo "killed: $f: '$old' -> '$new' by $t"
  fi
  git checkout -q -- "$f"
}
run lung_cls/data/datamodule.py 'return self._loader(self.split_indices("val"), train=False)' 'return self._loader(self.split_indices("test"), train=False)' tests/data/test_invariants.py::test_validation_loader_serves_exactly_the_validation_split
run lung_cls/data/datamodule.py 'train_idx = np.flatnonzero(splits == "train")' 'train_idx = np.flatnonzero(splits != "test")' tests/data/test_invariants.py::test_no_validation_or_test_image_or_patient_reaches_a_training_batch
run lung_cls/evaluation/callbacks.py 'targets=[int(v) for v in labels],' 'targets=[1 - int(v) for v in labels],' tests/evaluation/test_cam.py::test_run_artifacts_explain_the_true_class_and_keep_raw_cams
run lung_cls/report/cams.py 'fig["diff"] = vent.mean(axis=0) - perf.mean(axis=0)' 'fig["diff"] = perf.mean(axis=0) - vent.mean(axis=0)' tests/report/test_report_cams.py
run lung_cls/evaluation/figures.py 'DIFF_CMAP = "RdBu"' 'DIFF_CMAP = "RdBu_r"' tests/report/test_report_cams.py::test_difference_map_is_ventilation_minus_perfusion_drawn_red_where_perfusion_is_higher
run lung_cls/evaluation/metrics.py 'q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]' 'q = [5.0, 95.0]' 'tests/evaluation/test_stats.py::test_bootstrap_interval_is_95_percent'
run lung_cls/data/preprocess.py 'binary = norm >= float(c["threshold"])' 'binary = norm > 35' tests/data/test_invariants.py::test_lung_binarisation_uses_at_least_the_configured_threshold
run lung_cls/data/datamodule.py 'ref_idx = np.flatnonzero(train & centred)' 'ref_idx = np.flatnonzero(centred)' tests/data/test_invariants.py::test_nmi_fallback_is_aligned_to_training_images_only
run lung_cls/evaluation/stats.py 'q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]' 'q = [5.0, 95.0]' 'tests/evaluation/test_stats.py::test_bootstrap_interval_is_95_percent'
exit $survived
