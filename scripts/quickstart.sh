#!/usr/bin/env bash
# Quick start: build the agent, create a key pair (once), back up examples/app.db into
# ./backups with examples/quickstart.toml, and print the command that restores it.
#
#   scripts/quickstart.sh            # release build (first build takes a few minutes)
#   BACKUPY_PROFILE=dev scripts/quickstart.sh
#   BACKUPY_BIN_DIR=dist/release/x86_64-unknown-linux-musl scripts/quickstart.sh   # prebuilt
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${BACKUPY_PROFILE:-release}
dir=$([[ $profile == dev ]] && echo debug || echo "$profile")
if [[ -n ${BACKUPY_BIN_DIR:-} ]]; then
    bin=$BACKUPY_BIN_DIR
else
    echo "==> building backupy-agent and backupy-decrypt ($profile)" >&2
    cargo build --quiet --locked --profile "$profile" --bins
    bin=target/$dir
fi

if [[ ! -f backupy.key ]]; then
    echo "==> creating a key pair: backupy.key (private, keep it safe) and backupy.pub" >&2
    "$bin/backupy-agent" keygen --out backupy.key >backupy.pub
fi

echo "==> backing up examples/app.db" >&2
"$bin/backupy-agent" backup --config examples/quickstart.toml | tee .backupy-quickstart.out
object=$(cut -f3 .backupy-quickstart.out | tail -n 1)
sha=$(sed -n 's/.*sha256:\([0-9a-f]*\).*/\1/p' .backupy-quickstart.out | tail -n 1)
rm -f .backupy-quickstart.out

cat <<MSG

Backup stored: $object
Restore it with:

  $bin/backupy-decrypt --in $object --out restored.db --identity backupy.key --sha256 $sha

MSG
