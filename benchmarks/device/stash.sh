#!/bin/bash
# Keep what this transfer brought: the next transfer replaces the working copy it arrived in.
set -e
mkdir -p /root/stash/wheels /root/stash/parts
for dir in .whl/*/; do
  [ -d "$dir" ] || continue
  find "$dir" -name '*.whl' -exec cp {} /root/stash/wheels/ \;
  find "$dir" -name 'smol.part.*' -exec cp {} /root/stash/parts/ \;
done
if [ -d .carry ]; then mkdir -p /root/stash/carry; cp -r .carry/. /root/stash/carry/; fi
ls /root/stash/wheels | wc -l; ls -la /root/stash/parts; du -sh /root/stash
