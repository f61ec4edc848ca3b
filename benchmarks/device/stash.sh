#!/bin/bash
# Keep what this transfer brought: the next transfer replaces the working copy it arrived in.
set -e
mkdir -p /root/stash/wheels /root/stash/parts /root/stash/carry
for dir in .whl/*/; do
  [ -d "$dir" ] || continue
  find "$dir" -name '*.whl' -exec cp {} /root/stash/wheels/ \;
  find "$dir" -name 'smol.part.*' -exec cp {} /root/stash/parts/ \;
  # build_parts.py packs the code and the data (repo.tar.gz, data.tar.gz) into the parts too
  find "$dir" -name '*.tar.gz' -exec cp {} /root/stash/carry/ \;
done
if [ -d .carry ]; then cp -r .carry/. /root/stash/carry/; fi
ls /root/stash/wheels | wc -l; ls -la /root/stash/parts; du -sh /root/stash
