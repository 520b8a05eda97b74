#!/usr/bin/env bash
# Stops the one-node cluster started by .ci/slurm/start.sh (its daemons, by their pid files).
for f in /run/slurmd.pid /run/slurmctld.pid; do
    [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
done
