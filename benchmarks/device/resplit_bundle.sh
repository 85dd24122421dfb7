#!/bin/bash
# Re-split a bundle built by ../shared/device/make_bundle.py into smaller parts, here (not on
# the device). A device call carries at most 64 MiB: the working tree (tracked files, 15 MB in
# session 10, growing with benchmarks/results) plus one part. make_bundle.py writes 60 MiB
# parts, which no longer fit beside this repository (nor, since session 10, do 50 MiB parts);
# install_bundle.sh joins the parts in name order and checks the joined sha256, so smaller
# parts with the manifest's "parts" count updated install the same bundle.
#   bash benchmarks/device/resplit_bundle.sh vllm [SIZE]     # SIZE: split -b syntax, 40M
set -euo pipefail
name=${1:?usage: resplit_bundle.sh NAME [SIZE]}
size=${2:-40M}
dir=.device-bundle/$name
[ -f "$dir/manifest.json" ] || { echo "no bundle in $dir"; exit 2; }
tmp=$(mktemp -d)
cat "$dir"/part_* > "$tmp/all"
want=$(python3 -c "import json; print(json.load(open('$dir/manifest.json'))['sha256'])")
got=$(sha256sum "$tmp/all" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "$name: parts do not match the manifest's sha256"; rm -rf "$tmp"; exit 3; }
rm "$dir"/part_*
split -b "$size" -d -a 2 "$tmp/all" "$dir/part_"
rm -rf "$tmp"
n=$(ls "$dir"/part_* | wc -l)
python3 - "$dir/manifest.json" "$n" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
m = json.load(open(path))
m["parts"] = n
json.dump(m, open(path, "w"), indent=1)
PY
echo "$name: $n parts of at most $size in $dir"
# what one part's call carries: the tracked tree plus the largest part (limit 64 MiB)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
part=$(du -b "$dir"/part_00 | cut -f1)
echo "a part's call carries $(( (tree + part) / 1048576 )) MiB (tree $(( tree / 1048576 )) MiB + part); the limit is 64 MiB"
[ $(( tree + part )) -lt $(( 62 * 1048576 )) ] || echo "WARNING: less than 2 MiB to spare; pick a smaller SIZE"
