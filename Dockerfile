# syntax=docker/dockerfile:1
#
# cbt-csi driver image. Three stages:
#   build      compiles TypeScript (dev dependencies, compilers: stay here)
#   prod-deps  installs production node_modules and builds the native addons (better-sqlite3, roaring)
#   runtime    Debian slim + the node binary + the tools the node data plane runs (losetup, blkid, mount,
#              mkfs.ext4/resize2fs/e2fsck, mkfs.xfs/xfs_growfs)
#
# The native addons are compiled against the Node ABI and glibc of NODE_IMAGE (Debian 12), and the
# runtime copies its node binary from that same image onto the same Debian release, so the .node files
# load. Change NODE_IMAGE and DEBIAN_IMAGE together.
#
# Build:   docker build -t cbt-csi:dev .
# Without xfs support (about 60 MB smaller: xfsprogs pulls in python3 and libicu):
#          docker build --build-arg WITH_XFS=false -t cbt-csi:dev .
ARG NODE_IMAGE=node:20-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY storage-engine ./storage-engine
COPY src ./src
RUN npm run build

FROM ${NODE_IMAGE} AS prod-deps
WORKDIR /app
COPY package.json package-lock.json ./
# Only the loadable .node files are needed at run time; the sources, object files and static
# libraries node-gyp leaves behind are most of better-sqlite3's size.
RUN npm ci --omit=dev --no-audit --no-fund \
 && cd node_modules/better-sqlite3 \
 && rm -rf deps src build/deps build/Release/obj build/Release/obj.target build/Release/.deps \
           build/Release/sqlite3.a build/Release/test_extension.node

FROM ${DEBIAN_IMAGE} AS runtime
ARG WITH_XFS=true
# util-linux: losetup, blkid; mount: mount, umount; e2fsprogs: mkfs.ext4, resize2fs, e2fsck.
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux mount e2fsprogs \
      $( [ "$WITH_XFS" = "true" ] && echo xfsprogs ) \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
COPY package.json ./
COPY --from=prod-deps /app/node_modules ./node_modules
COPY --from=build /src/dist ./dist
# The driver mounts, attaches loop devices and serves /dev/fuse: it runs as root in a privileged
# container (see charts/cbt-csi). Flags follow `serve`, e.g. --endpoint, --node-id, --state-dir.
ENTRYPOINT ["node", "/app/dist/src/cli.js", "serve"]
