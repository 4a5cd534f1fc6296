#!/bin/sh
# Installs files and removes exactly those again, with a manifest. Called by the Makefile.
#
#   install.sh install   DESTDIR MANIFEST < LIST    LIST: lines "MODE SOURCE TARGET"
#   install.sh uninstall DESTDIR MANIFEST
#
# TARGET and MANIFEST are final paths (as on the installed system); DESTDIR, which may be
# empty, is put in front of them for every file operation. The manifest records, one per line,
# "f PATH" for each file installed and "d PATH" for each directory install had to create
# (parents first). Installing again over an earlier install keeps the directories that one
# created and removes the files it installed that this one does not (an upgrade leaves nothing
# behind). Uninstall removes the files, then the manifest, then the directories it created if
# they are empty, deepest first. Nothing else is ever removed.
set -eu

usage() {
    echo "usage: $0 install|uninstall DESTDIR MANIFEST" >&2
    exit 2
}
[ $# -eq 3 ] || usage
action=$1
destdir=$2
manifest=$3
case $manifest in /*) ;; *) echo "$0: MANIFEST must be an absolute path: $manifest" >&2; exit 2 ;; esac

new=$(mktemp)
trap 'rm -f "$new" "$new.dirs"' EXIT

# Creates the parents of $1 (a final path) that do not exist, recording each in $new.dirs.
# DESTDIR itself is a staging root, not part of the install: created, never recorded.
make_parents() {
    [ -z "$destdir" ] || mkdir -p "$destdir"
    dir=$(dirname "$1")
    missing=""
    while [ "$dir" != / ] && [ ! -d "$destdir$dir" ]; do
        missing="$dir $missing"
        dir=$(dirname "$dir")
    done
    for d in $missing; do
        mkdir -m 755 "$destdir$d"
        echo "d $d" >>"$new.dirs"
    done
}

case $action in
install)
    : >"$new.dirs"
    # Directories an earlier install created stay ours.
    if [ -f "$destdir$manifest" ]; then
        grep '^d ' "$destdir$manifest" >>"$new.dirs" || true
    fi
    while read -r mode src target; do
        [ -n "$mode" ] || continue
        case $target in *" "*) echo "$0: spaces in $target are not supported" >&2; exit 2 ;; esac
        make_parents "$target"
        install -m "$mode" "$src" "$destdir$target"
        echo "f $target" >>"$new"
        echo "  $destdir$target"
    done
    make_parents "$manifest"
    # Files of the earlier install that this one did not put again.
    if [ -f "$destdir$manifest" ]; then
        grep '^f ' "$destdir$manifest" | while read -r _ old; do
            if ! grep -qxF "f $old" "$new"; then
                rm -f "$destdir$old"
                echo "  removed $destdir$old (no longer installed)"
            fi
        done
    fi
    # Parents first, each once.
    awk '!seen[$0]++' "$new.dirs" >>"$new"
    install -m 644 "$new" "$destdir$manifest"
    echo "  $destdir$manifest (what \`make uninstall\` removes)"
    ;;
uninstall)
    if [ ! -f "$destdir$manifest" ]; then
        echo "$0: $destdir$manifest not found: nothing was installed with this PREFIX/DESTDIR" >&2
        exit 1
    fi
    grep '^f ' "$destdir$manifest" | while read -r _ path; do
        if [ -e "$destdir$path" ] || [ -L "$destdir$path" ]; then
            rm -f "$destdir$path"
            echo "  removed $destdir$path"
        fi
    done
    grep '^d ' "$destdir$manifest" >"$new.dirs" || true
    rm -f "$destdir$manifest"
    echo "  removed $destdir$manifest"
    # Deepest first: the reverse of creation order.
    awk '{ l[NR] = $2 } END { for (i = NR; i > 0; i--) print l[i] }' "$new.dirs" |
        while read -r d; do
            rmdir "$destdir$d" 2>/dev/null && echo "  removed $destdir$d/" || true
        done
    ;;
*)
    usage
    ;;
esac
