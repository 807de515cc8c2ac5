#!/usr/bin/env bash
# Applies the MoEvement patch (--ckpt-strategy moevement|gemini|moc) to a Megatron-LM checkout.
#
# Usage: scripts/apply_megatron_patch.sh [--check | --reverse] MEGATRON_LM_DIR
#
#   --check    only check that the patch applies (or is already applied); change nothing
#   --reverse  remove a previously applied patch
#
# The patch targets Megatron-LM tag core_v0.16.1 (megatron-core 0.16.1, the release this package
# pins). The checkout's version is read from megatron/core/package_info.py; other 0.16.x releases
# are accepted if the patch applies cleanly, anything else is refused. The checkout may be a git
# work tree or a plain directory (e.g. an unpacked release archive).
set -euo pipefail

readonly EXPECTED_MAJOR=0
readonly EXPECTED_MINOR=16
readonly EXPECTED_RELEASE="core_v0.16.1"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly PATCH="${MOEVEMENT_MEGATRON_PATCH:-$SCRIPT_DIR/../patches/megatron-lm-core_v0.16.1-moevement.patch}"

die() {
    echo "apply_megatron_patch.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

mode=apply
dir=""
while (($#)); do
    case "$1" in
        --check) mode=check ;;
        --reverse) mode=reverse ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option '$1'. Fix: use --check, --reverse or no option (see --help)." ;;
        *)
            [[ -z "$dir" ]] || die "more than one directory given ('$dir', '$1'). Fix: pass one Megatron-LM checkout."
            dir="$1"
            ;;
    esac
    shift
done
[[ -n "$dir" ]] || {
    usage >&2
    die "no Megatron-LM directory given. Fix: scripts/apply_megatron_patch.sh /path/to/Megatron-LM"
}
[[ -d "$dir" ]] || die "'$dir' is not a directory. Fix: pass the root of a Megatron-LM checkout."
dir="$(cd "$dir" && pwd)"
[[ -f "$PATCH" ]] || die "patch file '$PATCH' not found. Fix: run this script from a megatron-moevement checkout."

info="$dir/megatron/core/package_info.py"
[[ -f "$info" ]] || die "'$dir' has no megatron/core/package_info.py, so it is not a Megatron-LM checkout. Fix: git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout $EXPECTED_RELEASE, then pass that directory."
for f in pretrain_gpt.py megatron/training/training.py; do
    [[ -f "$dir/$f" ]] || die "'$dir' has no $f (the megatron-core wheel alone is not enough). Fix: use a full Megatron-LM checkout at $EXPECTED_RELEASE."
done

read_version_field() {
    sed -n "s/^$1[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$info" | head -n 1
}
major="$(read_version_field MAJOR)"
minor="$(read_version_field MINOR)"
patchlevel="$(read_version_field PATCH)"
[[ -n "$major" && -n "$minor" && -n "$patchlevel" ]] ||
    die "cannot read MAJOR/MINOR/PATCH from $info. Fix: use a Megatron-LM checkout at $EXPECTED_RELEASE."
version="$major.$minor.$patchlevel"
if [[ "$major" != "$EXPECTED_MAJOR" || "$minor" != "$EXPECTED_MINOR" ]]; then
    die "Megatron-LM at '$dir' is megatron-core $version, but this patch targets the $EXPECTED_RELEASE release (megatron-core $EXPECTED_MAJOR.$EXPECTED_MINOR.x). Fix: git -C '$dir' checkout $EXPECTED_RELEASE (megatron-moevement pins megatron-core 0.16.1)."
fi

# Run git apply on the checkout's own files: the ceiling stops git from treating an enclosing
# repository as the root (which would shift the patch paths).
git_apply() {
    (cd "$dir" && GIT_CEILING_DIRECTORIES="$(dirname "$dir")" git apply "$@" "$PATCH")
}

if git_apply --reverse --check 2>/dev/null; then
    applied=yes
else
    applied=no
fi

case "$mode" in
    check)
        if [[ "$applied" == yes ]]; then
            echo "MoEvement patch is already applied to $dir (megatron-core $version)."
        elif git_apply --check; then
            echo "MoEvement patch applies cleanly to $dir (megatron-core $version)."
        else
            die "the patch does not apply to $dir (megatron-core $version); see the git apply output above. Fix: use a clean checkout of $EXPECTED_RELEASE."
        fi
        ;;
    apply)
        if [[ "$applied" == yes ]]; then
            echo "MoEvement patch is already applied to $dir; nothing to do."
            exit 0
        fi
        git_apply --check || die "the patch does not apply to $dir (megatron-core $version); nothing was changed. Fix: use a clean checkout of $EXPECTED_RELEASE."
        git_apply
        echo "Applied the MoEvement patch to $dir (megatron-core $version). Run pretrain_gpt.py with --ckpt-strategy moevement (or the gemini / moc baseline); megatron_moevement must be importable (pip install -e this repository)."
        ;;
    reverse)
        [[ "$applied" == yes ]] || die "the MoEvement patch is not applied to $dir; nothing to reverse."
        git_apply --reverse
        echo "Removed the MoEvement patch from $dir."
        ;;
esac
