#!/usr/bin/env bash
# Screenshot of sample.py's HTML concept-inspection page in headless Chromium, with one generated token's
# concepts shown as on hover: a headless screenshot cannot hover, so it opens the page at that token's
# anchor (#r0tN), which the page's CSS treats like a hover.
#
#   docs/screenshot.sh OUT_DIR OUTPUT.png [more sample.py flags, e.g. --steer=123:8]
#   START="The capital of France" TOKENS=80 HOVER=10 docs/screenshot.sh out/cocomix docs/inspect.png
#
# Needs chromium (apt-get install -y chromium). HOVER = which generated token shows its tooltip (1-based).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '6,7p' "$0" >&2; exit 2; }
out_dir=$1; png=$(realpath -m "$2"); shift 2
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || command -v chrome-headless-shell) \
  || { echo "no headless browser found: apt-get install -y chromium" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nice -n 19 "${PYTHON:-python}" sample.py --out_dir="$out_dir" --start="${START:-The meaning of}" \
  --max_new_tokens="${TOKENS:-60}" --temperature=0 --inspect_top=5 --html="$tmp/page.html" "$@" > "$tmp/log" 2>&1 \
  || { cat "$tmp/log" >&2; exit 1; }
# the HOVER-th generated token of the first run (prompt tokens carry the class "tok prompt")
anchor=$(grep -o 'id="r0t[0-9]*" class="tok"' "$tmp/page.html" | sed -n "${HOVER:-8}p" | cut -d'"' -f2)
# --user-data-dir: a fresh profile, so nothing of a previous browser session leaks into the picture
nice -n 19 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$tmp/profile" \
  --window-size=1200,800 --screenshot="$png" "file://$tmp/page.html${anchor:+#$anchor}" > "$tmp/browser.log" 2>&1 \
  || { cat "$tmp/browser.log" >&2; exit 1; }
echo "wrote $png ($(du -k "$png" | cut -f1) KB; tooltip on ${anchor:-no token})"
