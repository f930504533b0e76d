#!/usr/bin/env bash
# Make Fashion-MNIST available without a download where possible: the Debian package
# dataset-fashion-mnist puts the IDX files in /usr/share/datasets/fashion-mnist. Where that
# cannot be installed, the data module falls back to torchvision's download at run time.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "Installing the Debian package dataset-fashion-mnist ..."
    if $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
       || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
      exit 0
    fi
  fi
fi
echo "Note: Fashion-MNIST is not in $dir and the Debian package could not be installed;" >&2
echo "      torchvision will download it into ./datasets on first use (needs internet)." >&2
exit 0
