#!/bin/sh
# Install packages with the node's own package manager, for the ztproxy role (tasks/packages.yml).
# Usage: install-packages.sh MANAGER SOURCE SCRATCH PACKAGE...
#   MANAGER  apt-get, dnf or yum
#   SOURCE   mirror: the node's configured repositories;
#            controller: only the repository copied from the controller into SCRATCH/repo (a flat apt
#            repository, or a dnf/yum repository with repodata/); the node fetches nothing.
#   SCRATCH  a directory of this run, removed by the caller afterwards.
# apt keeps its package lists, cache and auto-installed marks in SCRATCH, so the node's own apt state
# (/var/lib/apt, /var/cache/apt) is left as it was: what ztmesh installed is recorded by the role and
# purged by uninstall, package by package.
set -eu
manager="$1"
source="$2"
scratch="$3"
shift 3

case "$manager" in
apt-get)
    mkdir -p "$scratch/lists/partial" "$scratch/cache/archives/partial"
    export DEBIAN_FRONTEND=noninteractive
    # Word splitting of $options is wanted (SCRATCH is a mktemp path without spaces). APT::Sandbox::User:
    # the scratch directory is root's alone, so apt's unprivileged download user could not read it.
    options="-q -o Dir::State::Lists=$scratch/lists -o Dir::Cache=$scratch/cache
             -o Dir::State::extended_states=$scratch/extended_states -o APT::Sandbox::User=root"
    if [ "$source" = controller ]; then
        echo "deb [trusted=yes] file:$scratch/repo ./" >"$scratch/sources.list"
        options="$options -o Dir::Etc::SourceList=$scratch/sources.list -o Dir::Etc::SourceParts=/dev/null"
    fi
    # shellcheck disable=SC2086
    apt-get $options update >"$scratch/update.log" 2>&1 || {
        cat "$scratch/update.log" >&2
        echo "apt-get update failed (package source: $source)" >&2
        exit 1
    }
    # shellcheck disable=SC2086
    exec apt-get $options -y --no-install-recommends -o Dpkg::Use-Pty=0 install "$@"
    ;;
dnf | yum)
    if [ "$source" = controller ]; then
        exec "$manager" install -y --disablerepo='*' --repofrompath="ztmesh,$scratch/repo" \
            --enablerepo=ztmesh "$@"
    fi
    exec "$manager" install -y "$@"
    ;;
*)
    echo "install-packages.sh: unknown package manager '$manager'" >&2
    exit 2
    ;;
esac
