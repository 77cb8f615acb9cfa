# shellcheck shell=sh
# Sourced (sh or bash) from the checkout's root: makes this tree visible to Ansible as the
# collection libcare.livepatch, through build/collections (a symlink to the tree), so FQCN
# references such as libcare.livepatch.livepatch resolve offline.
libcare_link=$PWD/build/collections/ansible_collections/libcare/livepatch
mkdir -p "$(dirname "$libcare_link")"
[ "$(readlink "$libcare_link" 2>/dev/null)" = "$PWD" ] || ln -sfn "$PWD" "$libcare_link"
ANSIBLE_COLLECTIONS_PATH=$PWD/build/collections
export ANSIBLE_COLLECTIONS_PATH
