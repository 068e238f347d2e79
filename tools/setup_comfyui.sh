#!/usr/bin/env bash
# Set up ComfyUI with this pack on a fresh machine, in one command:
#
#   tools/setup_comfyui.sh DIR [--version TAG | --from ARCHIVE] [--venv VENV] [--torch "SPEC"] [--with-tests]
#
#   DIR             where ComfyUI goes (created; an existing ComfyUI there is reused as it is)
#   --version TAG   the ComfyUI release to clone from GitHub (default: the newest one the pack is tested on)
#   --from ARCHIVE  a local source archive instead, e.g. ../shared/hosts/comfyui-0.3.64.tar.gz
#   --venv VENV     the virtual environment to create or reuse (default: DIR/.venv)
#   --torch SPEC    the torch packages to install when the environment has none (default: "torch torchvision")
#   --with-tests    also install what the pack's host tier needs (reference implementations, pytest, browser driver)
#
# It installs ComfyUI's requirements (the torch lines aside: torch comes from --torch, torchaudio is not
# needed), the pack's own, links the pack into DIR/custom_nodes, and prints the commands that follow.
set -euo pipefail

PACK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NEWEST_TESTED=0.8.0
REPOSITORY=https://github.com/comfyanonymous/ComfyUI

usage() { sed -n '3,13s/^# \{0,1\}//p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
DIR=$1; shift
VERSION=$NEWEST_TESTED ARCHIVE="" VENV="" TORCH="torch torchvision" WITH_TESTS=0
while [ $# -gt 0 ]; do
  case $1 in
    --version) VERSION=$2; shift 2 ;;
    --from) ARCHIVE=$(realpath "$2"); shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --torch) TORCH=$2; shift 2 ;;
    --with-tests) WITH_TESTS=1; shift ;;
    *) echo "setup_comfyui: unknown option $1" >&2; usage ;;
  esac
done
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
VENV=$(realpath -m "${VENV:-$DIR/.venv}")

if [ -f "$DIR/main.py" ]; then
  echo "ComfyUI already in $DIR: kept as it is"
elif [ -n "$ARCHIVE" ]; then
  echo "ComfyUI from $ARCHIVE -> $DIR"
  tar -xzf "$ARCHIVE" -C "$DIR"
else
  echo "ComfyUI v$VERSION from $REPOSITORY -> $DIR"
  git clone --quiet --depth 1 --branch "v$VERSION" "$REPOSITORY" "$DIR"
fi
[ -f "$DIR/main.py" ] || { echo "setup_comfyui: no main.py in $DIR: not a ComfyUI source tree" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "installing $TORCH"
  # shellcheck disable=SC2086  # SPEC is a list of requirement specifiers
  "${PIP[@]}" $TORCH
fi
# Keep the installed torch pair: ComfyUI's requirements name torch, torchvision and torchaudio unpinned.
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
"${PIP[@]}" -r "$VENV/comfyui-requirements.txt" -r "$PACK_ROOT/requirements.txt"
if [ "$WITH_TESTS" = 1 ]; then
  "${PIP[@]}" -r "$PACK_ROOT/tests/requirements-host.txt"
fi

mkdir -p "$DIR/custom_nodes"
LINK="$DIR/custom_nodes/$(basename "$PACK_ROOT")"
[ -e "$LINK" ] || ln -s "$PACK_ROOT" "$LINK"

"$VENV/bin/python" - "$DIR" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import comfyui_version
print(f"ComfyUI {comfyui_version.__version__} is ready in {sys.argv[1]}")
EOF
cat <<EOF
The pack is linked at $LINK. Next:
  main job:  COMFYUI_PATH=$DIR $VENV/bin/python $PACK_ROOT/tools/run_workflow.py $PACK_ROOT/workflows/fastcomposer_two_subjects.json
  tests:     COMFYUI_PATH=$DIR $VENV/bin/python -m pytest $PACK_ROOT/tests
  ComfyUI:   $VENV/bin/python $DIR/main.py
EOF
