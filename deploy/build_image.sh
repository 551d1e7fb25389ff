#!/usr/bin/env bash
# Builds the dist image with no registry: a minimal Debian root filesystem from the apt
# mirror (mmdebstrap: glibc, libgcc and tini, extracted), the Deno binary from npm
# (@deno/linux-x64-glibc, the package `npx deno` runs), dist's source with its compiled
# cache, a non-root user; then `podman import` makes it an image. The same image as
# deploy/Containerfile, which needs the official Deno image from a registry.
#
#   deploy/build_image.sh [TAG]        default TAG: dist:VERSION (deno.json's version)
#
# Needs root (or mmdebstrap's unshare mode), mmdebstrap, npm and podman.
set -euo pipefail
cd "$(dirname "$0")/.."

deno_version=2.9.6
version=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' deno.json | head -1)
tag=${1:-dist:${version}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== Deno ${deno_version} from npm"
(cd "$work" && npm pack --silent "@deno/linux-x64-glibc@${deno_version}" >/dev/null && tar -xzf deno-linux-x64-glibc-*.tgz)
test -x "$work/package/deno"

echo "== dist's source"
mkdir -p "$work/dist"
cp deno.json main.ts mod.ts node.ts LICENSE "$work/dist/"
cp -r client protocol scheduler worker util "$work/dist/"

echo "== a Debian root filesystem (mmdebstrap)"
# Extracted, not installed: glibc and tini need no maintainer scripts, and the image has
# no package manager. Documentation, manuals and locales are left out.
root="$work/rootfs"
mmdebstrap --variant=extract --include=libc6,libgcc-s1,tini \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  bookworm "$root"
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/locale" "$root/usr/share/info" \
  "$root/var/lib/apt/lists"/* "$root/var/cache/apt"/* "$root/var/log"/*

echo "== Deno, dist, a user and the compiled cache"
install -D -m 755 "$work/package/deno" "$root/usr/local/bin/deno"
mkdir -p "$root/opt" "$root/home/dist" "$root/tmp" "$root/var/cache/deno" "$root/dev" "$root/proc"
cp -r "$work/dist" "$root/opt/dist"
chmod 1777 "$root/tmp"
# The user is written by hand (no passwd package).
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\ndist:x:10001:10001:dist:/home/dist:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\ndist:x:10001:\n' >"$root/etc/group"
# Compiled once here (in the root filesystem, at the paths the image runs it from), so a
# node starts without writing its cache.
DENO_DIR=/var/cache/deno DENO_NO_UPDATE_CHECK=1 \
  chroot "$root" /usr/local/bin/deno cache --no-config /opt/dist/main.ts /opt/dist/worker/executor.ts
chown -R 10001:10001 "$root/home/dist" "$root/var/cache/deno"
tar -C "$root" -cf "$work/rootfs.tar" .

echo "== podman import as ${tag}"
podman import \
  --change 'USER 10001:10001' \
  --change 'WORKDIR /home/dist' \
  --change 'ENV DENO_DIR=/var/cache/deno' \
  --change 'ENV DENO_NO_UPDATE_CHECK=1' \
  --change 'ENV GLIBC_TUNABLES=glibc.malloc.hugetlb=1' \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'EXPOSE 8786' \
  --change 'EXPOSE 8787' \
  --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/deno", "run", "--no-config", "--v8-flags=--heap-growing-percent=30", "--allow-net", "--allow-read", "--allow-write", "--allow-env", "--allow-sys", "--allow-run", "--unstable-worker-options", "/opt/dist/main.ts"]' \
  --change 'CMD ["--help"]' \
  "$work/rootfs.tar" "$tag" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "built ${tag}: $((size / 1000000)) MB"
