/**
 * Child process of the FUSE tests: serves one volume of a block store over a FUSE mount until it is
 * killed. Used to leave a mount behind a dead server (stale mount clean-up) and to check that what was
 * fsynced through the mount survives kill -9.
 *
 * Run as `node --import tsx fuse-child.ts <store-dir> <mount-point> <capacity-bytes>`.
 * Prints one JSON line `{"volumeId": "...", "file": "..."}` once the mount is serving.
 */
import path from 'node:path';
import { BlockStore } from '../../../storage-engine/index.js';
import { FuseServer } from '../../../src/dataplane/fuse/fuse-server.js';
import { VolumeFiles } from '../../../src/dataplane/fuse/volume-files.js';

const [storeDir, mountPoint, capacity] = process.argv.slice(2);
if (!storeDir || !mountPoint || !capacity)
  throw new Error('usage: fuse-child.ts <store-dir> <mount-point> <capacity-bytes>');

const store = BlockStore.open(storeDir);
const volume = await store.createVolume({ name: 'child-volume', capacityBytes: Number(capacity) });
const files = new VolumeFiles(store);
files.add(volume.id, volume.id);
await FuseServer.mount(mountPoint, files);
process.stdout.write(`${JSON.stringify({ volumeId: volume.id, file: path.join(mountPoint, volume.id) })}\n`);
// Serve until killed.
setInterval(() => undefined, 1 << 30);
