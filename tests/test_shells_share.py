"""Interactive shells of one user share a live copy of the same tarball
(real conda, real shells): a second 'conda activate' holds the first one's
copy instead of extracting again, 'conda deactivate' lets go and removes
the copy only when it was the last holder, and gc removes a copy whose
every holder was killed."""
import re

import pytest

from tests.test_core import enabled, new_env, run, values  # noqa: F401 -- fixtures

pytestmark = pytest.mark.conda


def test_a_second_shell_holds_the_live_copy_instead_of_extracting(enabled, run, user_tmp):
    env = enabled()
    r = run(f"""sleep 300 & a=$!
sleep 300 & b=$!
echo "first=$(conda-stage --stage --owner-pid $a {env.name})"
echo "second=$(conda-stage --stage --owner-pid $b {env.name})"
echo "after_a=$(conda-stage --unstage --owner-pid $a "$(ls -d $TMPDIR/conda-stage-*/{env.name})" 2>&1)"
ls -d $TMPDIR/conda-stage-*/{env.name} > /dev/null && echo "kept=yes"
conda-stage --unstage --owner-pid $b $TMPDIR/conda-stage-*/{env.name}
ls $TMPDIR | wc -l | sed 's/^/left=/'
kill $a $b""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["first"] == v["second"], r.stdout
    assert r.stderr.count("INFO: Extracting ") == 1, r.stderr
    assert f"INFO: Using the copy another shell staged from the same tarball: {v['first']}" \
        in r.stderr
    assert re.search(r"Keeping .*: 1 other shell\(s\) still use it", v["after_a"]), v["after_a"]
    assert v["kept"] == "yes" and v["left"] == "0", r.stdout


def test_conda_activate_in_a_second_shell_lands_on_the_first_shells_copy(enabled, run,
                                                                         conda_site):
    env = enabled()
    r = run(f"""bash -c '. {conda_site.init_file}; conda activate {env.name}
echo "$CONDA_PREFIX" > "$TMPDIR/first"; sleep 300' 2> /dev/null &
holder=$!
for i in $(seq 100); do [ -s "$TMPDIR/first" ] && break; sleep 0.2; done
conda activate {env.name}
echo "first=$(cat "$TMPDIR/first")"
echo "second=$CONDA_PREFIX"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
conda deactivate
test -d "$(cat "$TMPDIR/first")" && echo "kept_for_the_other_shell=yes"
kill -9 $holder; wait $holder 2> /dev/null
conda-stage gc
test -d "$(cat "$TMPDIR/first")" || echo "collected=yes"
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["first"] == v["second"] == v["sys_prefix"], r.stdout + r.stderr
    # (the first shell's messages go to /dev/null): the second extracts nothing
    assert "INFO: Extracting " not in r.stderr, r.stderr
    assert "INFO: Using the copy another shell staged from the same tarball" in r.stderr
    assert v["kept_for_the_other_shell"] == "yes"
    assert v["collected"] == "yes", r.stderr


def test_gc_keeps_a_copy_while_one_holder_lives_and_removes_it_after(enabled, run, user_tmp):
    env = enabled()
    r = run(f"""sleep 300 & a=$!
sleep 300 & b=$!
p=$(conda-stage --stage --owner-pid $a {env.name})
conda-stage --stage --owner-pid $b {env.name} > /dev/null
kill -9 $a; wait $a 2> /dev/null
conda-stage gc
test -d "$p" && echo "kept_while_b_lives=yes"
kill -9 $b; wait $b 2> /dev/null
conda-stage gc
test -d "$p" || echo "collected=yes"
ls $TMPDIR | wc -l | sed 's/^/left=/'""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["kept_while_b_lives"] == "yes" and v["collected"] == "yes", r.stdout + r.stderr
    assert v["left"] == "0"


def test_a_writable_request_never_shares(enabled, run):
    env = enabled()
    r = run(f"""sleep 300 & a=$!
one=$(conda-stage --stage --owner-pid $a {env.name})
two=$(conda-stage --stage --writable --owner-pid $$ {env.name})
[ "$one" != "$two" ] && echo "private=yes"
conda-stage --unstage --owner-pid $a "$one"; conda-stage --unstage "$two"
kill $a""")
    assert r.returncode == 0, r.stderr
    assert values(r.stdout)["private"] == "yes"


def test_a_copy_being_removed_is_never_shared(enabled, run):
    """'--unstage --background' of the last holder renames the copy's folder
    under its lock before it returns: another shell's '--stage' right after
    extracts a copy of its own instead of holding the one being deleted."""
    env = enabled()
    r = run(f"""sleep 300 & a=$!
sleep 300 & b=$!
one=$(conda-stage --stage --owner-pid $a {env.name})
conda-stage --unstage --background --owner-pid $a "$one"
two=$(conda-stage --stage --owner-pid $b {env.name})
[ "$one" != "$two" ] && echo "fresh=yes"
test -x "$two/bin/python" && echo "usable=yes"
conda-stage --unstage --owner-pid $b "$two"
kill $a $b""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["fresh"] == "yes" and v["usable"] == "yes", r.stdout + r.stderr
    assert r.stderr.count("INFO: Extracting ") == 2, r.stderr
    assert "Using the copy another shell staged" not in r.stderr
