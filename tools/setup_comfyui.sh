#!/usr/bin/env bash
# Set up what is missing for ComfyUI with this pack, in one command; a second run reuses what the first set up:
#
#   tools/setup_comfyui.sh DIR [--version TAG | --from ARCHIVE] [--venv VENV] [--torch "SPEC"] [--with-tests]
#
#   DIR             where ComfyUI goes (created; an existing ComfyUI there is kept as it is)
#   --version TAG   the ComfyUI release to clone from GitHub (default: the newest one the pack is tested on)
#   --from ARCHIVE  a local source archive instead, e.g. ../shared/hosts/comfyui-0.33.0.tar.gz
#   --venv VENV     the virtual environment to create or reuse (default: DIR/.venv)
#   --torch SPEC    the torch packages to install when the environment lacks torch, torchvision or torchaudio
#                   (default: "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1", a set the registry has whole)
#   --with-tests    also what the pack's tests need: reference implementations, pytest, the browser driver, and the
#                   newer graph-editor releases the browser tier opens the workflows in
#
# It installs ComfyUI's requirements (the torch lines aside: torch comes from --torch, since ComfyUI names it
# unpinned), the pack's own, and links the pack into DIR/custom_nodes. From 0.33.0 on ComfyUI does not start without
# torchaudio, and the registry's newest torchaudio (2.11.1) has no build beside torch 2.13 or 2.14: hence the default.
set -euo pipefail

PACK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NEWEST_TESTED=0.33.0
REPOSITORY=https://github.com/comfyanonymous/ComfyUI

usage() { sed -n '3,13s/^# \{0,1\}//p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
DIR=$1; shift
VERSION=$NEWEST_TESTED ARCHIVE="" VENV="" TORCH="torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1" WITH_TESTS=0
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

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if ! "$VENV/bin/python" -c "import torch, torchvision, torchaudio" 2>/dev/null; then
  echo "installing $TORCH"
  # shellcheck disable=SC2086  # SPEC is a list of requirement specifiers
  "${PIP[@]}" $TORCH
fi
# Keep the installed torch set: ComfyUI's requirements name torch, torchvision and torchaudio unpinned.
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
"${PIP[@]}" -r "$VENV/comfyui-requirements.txt" -r "$PACK_ROOT/requirements.txt"
if [ "$WITH_TESTS" = 1 ]; then
  "${PIP[@]}" -r "$PACK_ROOT/tests/requirements-host.txt"
  # Graph-editor releases besides the one ComfyUI pins, each in a folder of its own (main.py --front-end-root).
  while read -r frontend; do
    folder="$VENV/frontends/${frontend##*==}"
    [ -f "$folder/comfyui_frontend_package/static/index.html" ] ||
      "${PIP[@]}" --no-deps --target "$folder" "$frontend"
  done < <(grep -E '^[^#]' "$PACK_ROOT/tests/frontends.txt")
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
