#!/usr/bin/env bash
# Builds OUTDIR/trigd_<version>_<arch>.deb around the executable `make binary` made.
# The package installs the unit but enables nothing; /etc/trigd/trigd.toml is a conffile.
# Usage: packaging/build-deb.sh BINARY OUTDIR
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
binary=${1:?usage: build-deb.sh BINARY OUTDIR}
outdir=${2:?usage: build-deb.sh BINARY OUTDIR}
maintainer=${DEB_MAINTAINER:-trigd maintainers <maintainers@trigd.invalid>}

die() { echo "build-deb.sh: $*" >&2; exit 1; }

[ -x "$binary" ] || die "$binary is not an executable; run 'make binary' first"
version=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$root/daemon/__init__.py")
[ -n "$version" ] || die "no __version__ = \"...\" line in daemon/__init__.py"
# PEP 440 pre-releases sort before the release in Debian only with a tilde: 1.0rc1 -> 1.0~rc1.
deb_version=$(echo "$version" | sed -E 's/(a|b|rc|\.dev)([0-9]+)$/~\1\2/')
arch=$(dpkg --print-architecture)
# The bundle carries its own Python and libraries but links the build machine's glibc.
glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/trigd

install -D -m 0755 "$binary" "$pkg/usr/bin/trigd"
install -D -m 0644 "$here/trigd.service" "$pkg/lib/systemd/system/trigd.service"

# The commented default configuration, with automations read from /etc/trigd/automations.
# A directory rather than a glob: an empty directory is valid, an unmatched glob is not.
install -d -m 0755 "$pkg/etc/trigd/automations"
sed 's|^automations = \[\]$|automations = ["/etc/trigd/automations"]|' "$here/trigd.toml" \
    > "$pkg/etc/trigd/trigd.toml"
chmod 0644 "$pkg/etc/trigd/trigd.toml"
grep -qx 'automations = \["/etc/trigd/automations"\]' "$pkg/etc/trigd/trigd.toml" \
    || die "packaging/trigd.toml has no 'automations = []' line to point at /etc/trigd/automations"

doc=$pkg/usr/share/doc/trigd
install -D -m 0644 "$root/README.md" "$doc/README.md"
install -D -m 0644 "$here/examples/example.yaml" "$doc/examples/example.yaml"
install -D -m 0644 "$here/debian/copyright" "$doc/copyright"
for page in "$root"/docs/*.md; do  # the reference the config and the README point at
    install -D -m 0644 "$page" "$doc/docs/$(basename "$page")"
done
for example in "$root"/docs/examples/*; do  # the files docs/AUTOMATIONS.md links
    install -D -m 0644 "$example" "$doc/docs/examples/$(basename "$example")"
done

install -d -m 0755 "$pkg/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$pkg/DEBIAN/$script"
done
echo /etc/trigd/trigd.toml > "$pkg/DEBIAN/conffiles"
installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: trigd
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: libc6 (>= $glibc)
Section: admin
Priority: optional
Description: edge automation engine for Prefect-style events
 trigd takes Prefect events over a websocket, orders them causally, evaluates
 Prefect-style event triggers on them and delivers the resulting actions as
 signed webhooks from a durable outbox. All state lives in one SQLite file.
 .
 This package is a single self-contained executable and a systemd unit. It
 enables nothing: edit /etc/trigd/trigd.toml, then run
 'systemctl enable --now trigd'.
CONTROL

mkdir -p "$outdir"
out="$outdir/trigd_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$pkg" "$out" >/dev/null
echo "$out"
