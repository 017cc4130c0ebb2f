#!/usr/bin/env bash
# The review page's browser test drives a real Chromium: Debian's package, installed here when it is missing and can be
# (as root, or with password-less sudo). Otherwise it says why, and that test skips with the same reason.
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
if [ "$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then
  for attempt in install update-then-install; do
    [ "$attempt" = update-then-install ] && $sudo apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 && exit 0
  done
fi
echo "tests/browser.sh: no Chromium here and none could be installed (needs apt and root or sudo); the browser test will skip" >&2
exit 0
