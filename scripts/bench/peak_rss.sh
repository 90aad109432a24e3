#!/usr/bin/env bash
# Peak resident memory of one command, sampled every 0.5 s from /proc (VmRSS), as docs/long-sequences.md's
# "Status" tables were measured; the command is killed above LIMIT_KB (default 13,000,000 kB) to spare a
# shared machine. Not part of CI.
#   scripts/bench/peak_rss.sh betadpo train --artifacts ART --data rows.jsonl --out RUN --max-steps 1 ...
# prints "peak N kB" (and "killed above LIMIT_KB kB" when it was) after the command's own output; the samples
# go to $RSS_LOG when set ("unix-time kB" per line). Exit status: the command's.
set -u
limit=${LIMIT_KB:-13000000}
"$@" &
pid=$!
peak=0
killed=0
while kill -0 "$pid" 2>/dev/null; do
  r=$(awk '/^VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null)
  r=${r:-0}
  [ "$r" -gt "$peak" ] && peak=$r
  [ -n "${RSS_LOG:-}" ] && echo "$(date +%s) $r" >> "$RSS_LOG"
  if [ "$r" -gt "$limit" ]; then kill "$pid"; killed=1; fi
  sleep 0.5
done
wait "$pid"
rc=$?
echo "peak $peak kB"
[ "$killed" = 1 ] && echo "killed above $limit kB"
exit $rc
