/**
 * The FUSE data plane against the real kernel: a mount served by this process (FuseServer + VolumeFiles
 * over a real BlockStore), used through plain file calls, util-linux tools and a direct-I/O loop device.
 *
 * Needs root, /dev/fuse, loop devices and util-linux. Without them the suite is skipped with the reason,
 * except under CI=true where a missing prerequisite is a failure.
 *
 * Every access to the mount from this process is asynchronous (threadpool or child process): the main
 * thread is the one answering the kernel, so a synchronous call into the mount would wait on itself.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BlockStore, type Extent, type VolumeInfo } from '../../storage-engine/index.js';
import { FuseServer } from '../../src/dataplane/fuse/fuse-server.js';
import { fuseMountsAt } from '../../src/dataplane/fuse/mount.js';
import { VolumeFiles, type VolumeBackend } from '../../src/dataplane/fuse/volume-files.js';

const run = promisify(execFile);
const fsp = fs.promises;
const MiB = 1024 * 1024;
const BLOCK = 4096;
const childScript = path.join(path.dirname(fileURLToPath(import.meta.url)), 'support', 'fuse-child.ts');

function missingPrerequisite(): string | undefined {
  if (process.platform !== 'linux') return 'FUSE tests need Linux';
  if (process.getuid?.() !== 0) return 'FUSE tests need root (mount, losetup)';
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing';
  if (!fs.existsSync('/dev/loop-control')) return 'loop devices are missing (/dev/loop-control)';
  for (const tool of ['mount', 'umount', 'losetup', 'fallocate', 'dd', 'blkdiscard', 'fincore']) {
    const found = (process.env.PATH ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, tool)));
    if (!found) return `${tool} (util-linux/coreutils) is not on PATH`;
  }
  return undefined;
}

const missing = missingPrerequisite();
/** fio drives the concurrent verify test only. */
const fioMissing = !(process.env.PATH ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, 'fio')));
const mustRun = process.env.CI === 'true';

/** Deterministic bytes: content derived from a seed, so a misplaced or stale block is recognised. */
function pattern(seed: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let off = 0;
  for (let counter = 0; off < length; counter++) {
    const h = createHash('sha256').update(`${seed}:${counter}`).digest();
    off += h.copy(out, off);
  }
  return out;
}

async function collect(stream: AsyncIterable<Extent[]>): Promise<Extent[]> {
  const all: Extent[] = [];
  for await (const batch of stream) all.push(...batch);
  return all;
}

/** A BlockStore view that counts completed flushes, to see FSYNC reach the engine. */
function countingBackend(store: BlockStore): { backend: VolumeBackend; flushes: string[] } {
  const flushes: string[] = [];
  const backend: VolumeBackend = {
    getVolume: (id) => store.getVolume(id),
    read: (id, offset, length) => store.read(id, offset, length),
    write: (id, offset, data) => store.write(id, offset, data),
    trim: (id, offset, length) => store.trim(id, offset, length),
    flush: async (id) => {
      await store.flush(id);
      flushes.push(id);
    },
    growVolume: (id, capacity) => store.growVolume(id, capacity),
    hold: (id, holder) => store.hold(id, holder),
    release: (id, holder) => store.release(id, holder),
    openDirectIo: (id, host) => store.openDirectIo(id, host),
  };
  return { backend, flushes };
}

interface Harness {
  dir: string;
  mountPoint: string;
  storeDir: string;
  store: BlockStore;
  files: VolumeFiles;
  server: FuseServer;
  flushes: string[];
}

describe.skipIf(missing !== undefined && !mustRun)(`FUSE data plane${missing ? ` (skipped: ${missing})` : ''}`, () => {
  let h: Harness | undefined;
  const loops: string[] = [];
  const children: ChildProcess[] = [];
  const dirs: string[] = [];

  beforeAll(() => {
    if (missing) throw new Error(`CI=true but the FUSE tests cannot run: ${missing}`);
  });

  async function start(): Promise<Harness> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fuse-test-'));
    dirs.push(dir);
    const mountPoint = path.join(dir, 'mnt');
    fs.mkdirSync(mountPoint);
    const storeDir = path.join(dir, 'store');
    const store = BlockStore.open(storeDir);
    const { backend, flushes } = countingBackend(store);
    const files = new VolumeFiles(backend);
    const server = await FuseServer.mount(mountPoint, files);
    h = { dir, mountPoint, storeDir, store, files, server, flushes };
    return h;
  }

  async function attachLoop(file: string): Promise<string> {
    const { stdout } = await run('losetup', ['--direct-io=on', '--show', '-f', file]);
    const dev = stdout.trim();
    loops.push(dev);
    return dev;
  }

  /** A new volume of the harness's store, shown as a file and attached to a direct-I/O loop device. */
  async function volumeOnLoop(name: string, capacityBytes: number): Promise<{ v: VolumeInfo; dev: string }> {
    const v = await h!.store.createVolume({ name, capacityBytes });
    h!.files.add(v.id, v.id);
    return { v, dev: await attachLoop(path.join(h!.mountPoint, v.id)) };
  }
  async function detachLoop(dev: string): Promise<void> {
    await run('losetup', ['-d', dev]);
    loops.splice(loops.indexOf(dev), 1);
  }

  afterEach(async () => {
    for (const dev of loops.splice(0)) await run('losetup', ['-d', dev]).catch(() => undefined);
    for (const c of children.splice(0)) c.kill('SIGKILL');
    if (h) {
      await h.server.close();
      await h.store.close();
      h = undefined;
    }
    for (const d of dirs.splice(0)) {
      const mp = path.join(d, 'mnt');
      // A test that failed half way may leave a child's mount; never rm -r through a mount.
      if (fs.existsSync(d) && fuseMountsAt(mp).length > 0) await run('umount', ['-l', mp]).catch(() => undefined);
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('shows one regular file per added volume, sized to the volume capacity, and drops removed ones', async () => {
    const { store, files, mountPoint } = await start();
    const a = await store.createVolume({ name: 'a', capacityBytes: 8 * MiB });
    const b = await store.createVolume({ name: 'b', capacityBytes: 3 * MiB + 5 * BLOCK });
    files.add(a.id, a.id);
    files.add(b.id, b.id);

    expect((await fsp.readdir(mountPoint)).sort()).toEqual([a.id, b.id].sort());
    for (const v of [a, b]) {
      const st = await fsp.stat(path.join(mountPoint, v.id));
      expect(st.isFile()).toBe(true);
      expect(st.size).toBe(v.capacityBytes);
    }

    await files.remove(a.id);
    expect(await fsp.readdir(mountPoint)).toEqual([b.id]);
    await expect(fsp.stat(path.join(mountPoint, a.id))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('lists every file when the listing spans several READDIR replies', async () => {
    const { store, files, mountPoint } = await start();
    // About 85 entries of this name length fit in one 4 KiB READDIR reply.
    const ids: string[] = [];
    for (let i = 0; i < 200; i++) {
      const v = await store.createVolume({ name: `many-${i}`, capacityBytes: BLOCK });
      files.add(v.id, v.id);
      ids.push(v.id);
    }
    const { stdout } = await run('ls', ['-1', '-f', mountPoint]);
    expect(stdout.trim().split('\n').sort()).toEqual(['.', '..', ...ids].sort());
  });

  it('a failed mount (no such mount point) leaves nothing behind and a later mount works', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fuse-test-'));
    dirs.push(dir);
    const store = BlockStore.open(path.join(dir, 'store'));
    try {
      const files = new VolumeFiles(store);
      const missingDir = path.join(dir, 'absent');
      const openFds = fs.readdirSync('/proc/self/fd').length;
      await expect(FuseServer.mount(missingDir, files)).rejects.toThrow(/mount/);
      expect(fs.readdirSync('/proc/self/fd').length).toBe(openFds);
      expect(fuseMountsAt(missingDir)).toHaveLength(0);
      fs.mkdirSync(missingDir);
      const server = await FuseServer.mount(missingDir, files);
      expect(await fsp.readdir(missingDir)).toEqual([]);
      await server.close();
    } finally {
      await store.close();
    }
  });

  it('holds an exposed volume in the store so it cannot be deleted until the file is removed', async () => {
    const { store, files } = await start();
    const v = await store.createVolume({ name: 'held', capacityBytes: MiB });
    files.add(v.id, v.id);
    await expect(store.deleteVolume(v.id)).rejects.toMatchObject({ code: 'BUSY' });
    await files.remove(v.id);
    await store.deleteVolume(v.id);
  });

  it('bytes written through the mount are what the engine reads, and engine writes read back through the mount', async () => {
    const { store, files, mountPoint } = await start();
    const v = await store.createVolume({ name: 'rw', capacityBytes: 16 * MiB });
    files.add(v.id, v.id);
    const file = await fsp.open(path.join(mountPoint, v.id), fs.constants.O_RDWR | fs.constants.O_DIRECT);
    try {
      // Aligned large, aligned small and unaligned writes: FUSE passes each as given to the engine.
      const writes = [
        { offset: 0, data: pattern(1, MiB) },
        { offset: 5 * MiB, data: pattern(2, 3 * BLOCK) },
        { offset: 9 * MiB + 1234, data: pattern(3, 5000) },
        { offset: 16 * MiB - BLOCK, data: pattern(4, BLOCK) },
      ];
      for (const w of writes) {
        const { bytesWritten } = await file.write(w.data, 0, w.data.length, w.offset);
        expect(bytesWritten).toBe(w.data.length);
      }
      for (const w of writes) expect(store.read(v.id, w.offset, w.data.length).equals(w.data)).toBe(true);

      const fromEngine = pattern(5, 2 * BLOCK + 17);
      store.write(v.id, 7 * MiB + 100, fromEngine);
      const back = Buffer.alloc(fromEngine.length);
      const { bytesRead } = await file.read(back, 0, back.length, 7 * MiB + 100);
      expect(bytesRead).toBe(fromEngine.length);
      expect(back.equals(fromEngine)).toBe(true);

      // The file ends where the volume does: reads stop there and writes beyond it are refused.
      const tail = Buffer.alloc(2 * BLOCK);
      expect((await file.read(tail, 0, tail.length, 16 * MiB - BLOCK)).bytesRead).toBe(BLOCK);
      await expect(file.write(pattern(6, BLOCK), 0, BLOCK, 16 * MiB)).rejects.toMatchObject({ code: 'ENOSPC' });
    } finally {
      await file.close();
    }
  });

  it('fsync through the mount flushes the volume in the engine before it returns', async () => {
    const { store, files, mountPoint, flushes } = await start();
    const v = await store.createVolume({ name: 'sync', capacityBytes: 4 * MiB });
    files.add(v.id, v.id);
    const file = await fsp.open(path.join(mountPoint, v.id), fs.constants.O_RDWR);
    try {
      await file.write(pattern(7, BLOCK), 0, BLOCK, 0);
      expect(flushes).toEqual([]);
      await file.sync();
      expect(flushes).toEqual([v.id]);
      await file.datasync();
      expect(flushes).toEqual([v.id, v.id]);
    } finally {
      await file.close();
    }
  });

  it('punching a hole trims exactly the punched blocks: they read as zeros and appear in the next delta', async () => {
    const { store, files, mountPoint } = await start();
    const v = await store.createVolume({ name: 'punch', capacityBytes: 64 * BLOCK });
    files.add(v.id, v.id);
    const file = path.join(mountPoint, v.id);
    const content = pattern(8, 32 * BLOCK);
    const fh = await fsp.open(file, fs.constants.O_RDWR);
    await fh.write(content, 0, content.length, 0);
    await fh.sync();
    await fh.close();
    const before = await store.createSnapshot({ volumeId: v.id, name: 'before' });

    const punch = { offset: 4 * BLOCK, length: 6 * BLOCK };
    await run('fallocate', [
      '--punch-hole',
      '--keep-size',
      '-o',
      String(punch.offset),
      '-l',
      String(punch.length),
      file,
    ]);
    const zero = { offset: 20 * BLOCK, length: 2 * BLOCK };
    await run('fallocate', ['--zero-range', '--keep-size', '-o', String(zero.offset), '-l', String(zero.length), file]);
    const after = await store.createSnapshot({ volumeId: v.id, name: 'after' });

    expect(await collect(store.delta(before.id, after.id))).toEqual([punch, zero]);
    const expected = Buffer.from(content);
    expected.fill(0, punch.offset, punch.offset + punch.length);
    expected.fill(0, zero.offset, zero.offset + zero.length);
    expect(store.read(v.id, 0, content.length).equals(expected)).toBe(true);
    expect((await fsp.stat(file)).size).toBe(64 * BLOCK);
  });

  it('grows the volume when the file is extended and refuses to shrink or truncate it', async () => {
    const { store, files, mountPoint } = await start();
    const v = await store.createVolume({ name: 'grow', capacityBytes: 4 * MiB });
    files.add(v.id, v.id);
    const file = path.join(mountPoint, v.id);

    await fsp.truncate(file, 6 * MiB);
    expect(store.getVolume(v.id).capacityBytes).toBe(6 * MiB);
    expect((await fsp.stat(file)).size).toBe(6 * MiB);

    await expect(fsp.truncate(file, 2 * MiB)).rejects.toMatchObject({ code: 'EINVAL' });
    // O_TRUNC would wipe the volume; opening with it must fail and leave the data alone.
    store.write(v.id, 0, pattern(9, BLOCK));
    await expect(fsp.open(file, 'w')).rejects.toMatchObject({ code: 'EINVAL' });
    expect(store.getVolume(v.id).capacityBytes).toBe(6 * MiB);
    expect(store.read(v.id, 0, BLOCK).equals(pattern(9, BLOCK))).toBe(true);

    // Growth decided by the owner (ControllerExpand) is visible at once, not after the attribute cache expires.
    await fsp.stat(file);
    await files.grow(v.id, 10 * MiB);
    expect((await fsp.stat(file)).size).toBe(10 * MiB);
  });

  it('a direct-I/O loop device over the file reads and writes the volume, and discards become trims', async () => {
    const { store, files } = await start();
    const { v, dev } = await volumeOnLoop('loop', 64 * MiB);
    expect(fs.readFileSync(`/sys/block/${path.basename(dev)}/loop/dio`, 'utf8').trim()).toBe('1');
    expect(files.openCount(v.id)).toBe(1);

    const src = path.join(h!.dir, 'src.bin');
    const data = pattern(10, 3 * MiB);
    fs.writeFileSync(src, data);
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=1M', 'seek=5', 'oflag=direct', 'status=none']);
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=4k', 'count=3', 'seek=4000', 'oflag=direct', 'status=none']);
    expect(store.read(v.id, 5 * MiB, data.length).equals(data)).toBe(true);
    expect(store.read(v.id, 4000 * BLOCK, 3 * BLOCK).equals(data.subarray(0, 3 * BLOCK))).toBe(true);

    const fromEngine = pattern(11, 2 * MiB);
    store.write(v.id, 40 * MiB, fromEngine);
    const out = path.join(h!.dir, 'out.bin');
    await run('dd', [`if=${dev}`, `of=${out}`, 'bs=1M', 'skip=40', 'count=2', 'iflag=direct', 'status=none']);
    expect(fs.readFileSync(out).equals(fromEngine)).toBe(true);

    const snap = await store.createSnapshot({ volumeId: v.id, name: 'pre-discard' });
    await run('blkdiscard', ['-o', String(6 * MiB), '-l', String(MiB), dev]);
    const later = await store.createSnapshot({ volumeId: v.id, name: 'post-discard' });
    expect(await collect(store.delta(snap.id, later.id))).toEqual([{ offset: 6 * MiB, length: MiB }]);
    expect(store.read(v.id, 6 * MiB, MiB).equals(Buffer.alloc(MiB))).toBe(true);

    await detachLoop(dev);
  });

  it('1 MiB direct writes through the loop device (throughput, printed)', async () => {
    const { store } = await start();
    const { v, dev } = await volumeOnLoop('speed', 512 * MiB);
    const src = path.join(h!.dir, 'speed.bin');
    // Random rather than derived bytes: hashing 256 MiB would take longer than the I/O being measured.
    const data = randomFillSync(Buffer.alloc(256 * MiB));
    fs.writeFileSync(src, data);
    const t0 = process.hrtime.bigint();
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=1M', 'oflag=direct', 'status=none']);
    const writeSec = Number(process.hrtime.bigint() - t0) / 1e9;
    const t1 = process.hrtime.bigint();
    await run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=1M', 'count=256', 'iflag=direct', 'status=none']);
    const readSec = Number(process.hrtime.bigint() - t1) / 1e9;
    console.log(
      `FUSE loop throughput, 1 MiB direct I/O: write ${(256 / writeSec).toFixed(0)} MiB/s, read ${(256 / readSec).toFixed(0)} MiB/s`,
    );
    expect(store.read(v.id, 100 * MiB, MiB).equals(data.subarray(100 * MiB, 101 * MiB))).toBe(true);
    await detachLoop(dev);
  });

  it('the I/O threads answer whole-block reads and writes of an open file themselves; partial blocks go through the engine', async () => {
    const { store, server } = await start();
    const { v, dev } = await volumeOnLoop('direct', 32 * MiB);
    const src = path.join(h!.dir, 'direct.bin');
    const data = pattern(20, 2 * MiB);
    fs.writeFileSync(src, data);
    const before = server.directRequests;
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=64k', 'seek=16', 'oflag=direct', 'status=none']);
    expect(server.directRequests).toBeGreaterThan(before);
    expect(store.read(v.id, MiB, data.length).equals(data)).toBe(true);
    // 512-byte writes are partial blocks: the main thread does them through the engine, and the threads then
    // read them back from their copy of the index.
    const small = path.join(h!.dir, 'small.bin');
    fs.writeFileSync(small, pattern(21, 512));
    await run('dd', [`if=${small}`, `of=${dev}`, 'bs=512', 'seek=2049', 'oflag=direct', 'status=none']);
    const out = path.join(h!.dir, 'out.bin');
    const afterWrites = server.directRequests;
    await run('dd', [`if=${dev}`, `of=${out}`, 'bs=1M', 'skip=1', 'count=2', 'iflag=direct', 'status=none']);
    expect(server.directRequests).toBeGreaterThan(afterWrites);
    const expected = Buffer.from(data);
    pattern(21, 512).copy(expected, 2049 * 512 - MiB);
    expect(fs.readFileSync(out).equals(expected)).toBe(true);
    await detachLoop(dev);
  });

  it('large reads of the head bypass the page cache (readahead would leave large folios that make 4 KiB writes slow); reads of frozen layers stay cached', async () => {
    const { store, storeDir } = await start();
    const { v, dev } = await volumeOnLoop('uncached', 16 * MiB);
    const src = path.join(h!.dir, 'uncached.bin');
    const data = pattern(22, 8 * MiB);
    fs.writeFileSync(src, data);
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=1M', 'oflag=direct', 'conv=fsync', 'status=none']);
    const layers = path.join(storeDir, 'layers');
    const largest = (): string =>
      fs
        .readdirSync(layers)
        .map((f) => path.join(layers, f))
        .sort((a, b) => fs.statSync(b).blocks - fs.statSync(a).blocks)[0]!;
    const evict = async (file: string): Promise<void> => {
      await run('sync', ['-f', file]);
      await run('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
    };
    const resident = async (file: string): Promise<number> =>
      Number((await run('fincore', ['--bytes', '--noheadings', '--output', 'RES', file])).stdout.trim());
    const readBack = async (): Promise<Buffer> => {
      const out = path.join(h!.dir, 'uncached.out');
      await run('dd', [`if=${dev}`, `of=${out}`, 'bs=1M', 'count=8', 'iflag=direct', 'status=none']);
      return fs.readFileSync(out);
    };

    // The layer file holding the 8 MiB: the head until the snapshot below freezes it.
    const layer = largest();
    await evict(layer);
    expect(await resident(layer)).toBe(0);
    expect((await readBack()).equals(data)).toBe(true);
    expect(await resident(layer)).toBe(0);

    // After a snapshot the same bytes sit in a frozen layer, never written again: read through the cache.
    await store.createSnapshot({ volumeId: v.id, name: 'frozen' });
    await evict(layer);
    expect((await readBack()).equals(data)).toBe(true);
    expect(await resident(layer)).toBeGreaterThan(0);
    await detachLoop(dev);
  });

  it('a volume the serveDirectly predicate refuses is served by the main thread, until it is reconsidered', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fuse-test-'));
    dirs.push(dir);
    const mountPoint = path.join(dir, 'mnt');
    fs.mkdirSync(mountPoint);
    const storeDir = path.join(dir, 'store');
    const store = BlockStore.open(storeDir);
    let direct = false;
    const files = new VolumeFiles(store, { serveDirectly: () => direct });
    const server = await FuseServer.mount(mountPoint, files);
    h = { dir, mountPoint, storeDir, store, files, server, flushes: [] };
    const { v, dev } = await volumeOnLoop('limited', 8 * MiB);
    const src = path.join(dir, 'limited.bin');
    fs.writeFileSync(src, pattern(24, MiB));
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=4k', 'oflag=direct', 'status=none']);
    await run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4k', 'count=256', 'iflag=direct', 'status=none']);
    expect(server.directRequests).toBe(0);
    direct = true;
    files.reconsiderDirectIo(v.id);
    await run('dd', [`if=${src}`, `of=${dev}`, 'bs=4k', 'seek=256', 'oflag=direct', 'status=none']);
    // Most of the 256 writes; one may still reach the main thread while the new session is being picked up.
    expect(server.directRequests).toBeGreaterThan(128);
    direct = false;
    files.reconsiderDirectIo(v.id);
    const before = server.directRequests;
    await run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4k', 'count=512', 'iflag=direct', 'status=none']);
    expect(server.directRequests).toBe(before);
    expect(store.read(v.id, 0, 2 * MiB).equals(Buffer.concat([pattern(24, MiB), pattern(24, MiB)]))).toBe(true);
    await detachLoop(dev);
  });

  it('a write to a block a change record excludes goes through the engine, which updates the record first (invariant 8)', async () => {
    const { store, files, server, mountPoint } = await start();
    const v = await store.createVolume({ name: 'excluded', capacityBytes: 8 * MiB });
    const base = await store.createSnapshot({ volumeId: v.id, name: 'base' });
    store.write(v.id, 0, pattern(25, 8 * BLOCK));
    const s1 = await store.createSnapshot({ volumeId: v.id, name: 's1' });
    await store.deleteSnapshot(s1.id);
    await store.compact();
    files.add(v.id, v.id);
    const dev = await attachLoop(path.join(mountPoint, v.id));
    const block = path.join(h!.dir, 'block.bin');
    fs.writeFileSync(block, pattern(26, BLOCK));
    let before = server.directRequests;
    await run('dd', [`if=${block}`, `of=${dev}`, 'bs=4k', 'seek=5', 'oflag=direct', 'status=none']);
    expect(server.directRequests).toBe(before);
    before = server.directRequests;
    await run('dd', [`if=${block}`, `of=${dev}`, 'bs=4k', 'seek=100', 'oflag=direct', 'status=none']);
    expect(server.directRequests).toBe(before + 1);
    const s2 = await store.createSnapshot({ volumeId: v.id, name: 's2' });
    expect(await collect(store.delta(base.id, s2.id))).toEqual([
      { offset: 0, length: 8 * BLOCK },
      { offset: 100 * BLOCK, length: BLOCK },
    ]);
    expect(await collect(store.delta(s1.id, s2.id))).toEqual([
      { offset: 5 * BLOCK, length: BLOCK },
      { offset: 100 * BLOCK, length: BLOCK },
    ]);
    await detachLoop(dev);
  });

  it('a snapshot holds every write answered before it and none after; reads through the device see both sides', async () => {
    const { store, server } = await start();
    const { v, dev } = await volumeOnLoop('cut', 16 * MiB);
    const first = path.join(h!.dir, 'first.bin');
    const second = path.join(h!.dir, 'second.bin');
    fs.writeFileSync(first, pattern(22, MiB));
    fs.writeFileSync(second, pattern(23, MiB));
    const base = await store.createSnapshot({ volumeId: v.id, name: 'base' });
    // No fsync: an answered write is in the head's bits, whether or not it was made durable yet.
    await run('dd', [`if=${first}`, `of=${dev}`, 'bs=4k', 'seek=256', 'oflag=direct', 'status=none']);
    const snap = await store.createSnapshot({ volumeId: v.id, name: 'cut' });
    const afterSnapshot = server.directRequests;
    await run('dd', [`if=${second}`, `of=${dev}`, 'bs=4k', 'seek=256', 'count=128', 'oflag=direct', 'status=none']);
    // The session ended at the cut and a new one started on the new head: these went through the threads too.
    expect(server.directRequests).toBeGreaterThan(afterSnapshot);
    expect(store.readSnapshot(snap.id, MiB, MiB).equals(pattern(22, MiB))).toBe(true);
    expect(await collect(store.delta(base.id, snap.id))).toEqual([{ offset: MiB, length: MiB }]);
    const out = path.join(h!.dir, 'cut-out.bin');
    await run('dd', [`if=${dev}`, `of=${out}`, 'bs=1M', 'skip=1', 'count=1', 'iflag=direct', 'status=none']);
    const expected = Buffer.concat([pattern(23, MiB).subarray(0, 128 * BLOCK), pattern(22, MiB).subarray(128 * BLOCK)]);
    expect(fs.readFileSync(out).equals(expected)).toBe(true);
    await detachLoop(dev);
  });

  it.skipIf(fioMissing && !mustRun)(
    `reads through the device see every answered write while snapshots, deletes, merges, engine writes and discards run (fio verify)${fioMissing ? ' (skipped: fio is not on PATH)' : ''}`,
    async () => {
      if (fioMissing) throw new Error('CI=true but fio is not on PATH');
      const { store, files, server, mountPoint } = await start();
      const v = await store.createVolume({ name: 'verify', capacityBytes: 64 * MiB });
      files.add(v.id, v.id);
      const dev = await attachLoop(path.join(mountPoint, v.id));
      // fio writes random 4 KiB blocks of the first 16 MiB and reads each back to check it, during and after
      // the writes. Meanwhile the engine cuts snapshots, deletes and merges them, and writes and trims blocks
      // of its own further on, so the threads' sessions end and restart under the I/O.
      const fio = execFile('fio', [
        '--name=verify',
        `--filename=${dev}`,
        '--ioengine=libaio',
        '--direct=1',
        '--iodepth=16',
        '--rw=randwrite',
        '--bs=4k',
        '--size=16m',
        '--io_size=48m',
        '--verify=crc32c',
        '--verify_backlog=256',
        '--verify_fatal=1',
        // No state file in the working directory.
        '--verify_state_save=0',
        '--randseed=7',
      ]);
      const finished = new Promise<number>((resolve) => fio.on('exit', (code) => resolve(code ?? -1)));
      let stderr = '';
      fio.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      let running = true;
      void finished.then(() => (running = false));
      let previous: string | undefined;
      let rounds = 0;
      for (let i = 0; running; i++) {
        const snap = await store.createSnapshot({ volumeId: v.id, name: `s${i}` });
        if (previous) await store.deleteSnapshot(previous);
        previous = snap.id;
        store.write(v.id, 32 * MiB + (i % 64) * BLOCK + 100, pattern(30 + i, BLOCK));
        await run('blkdiscard', ['-o', String(48 * MiB + (i % 16) * 64 * 1024), '-l', String(64 * 1024), dev]);
        await store.compact();
        rounds++;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const code = await finished;
      expect(stderr).not.toMatch(/verify|bad/i);
      expect(code).toBe(0);
      expect(rounds).toBeGreaterThan(1);
      expect(server.directRequests).toBeGreaterThan(1000);
      await detachLoop(dev);
    },
  );

  it('close unmounts: nothing is left in mountinfo, and a second close is harmless', async () => {
    const { server, mountPoint } = await start();
    expect(fuseMountsAt(mountPoint)).toHaveLength(1);
    await server.close();
    expect(fuseMountsAt(mountPoint)).toHaveLength(0);
    expect(server.connected).toBe(false);
    await server.close();
  });

  it('close still unmounts while a loop device holds a file open', async () => {
    const { store, files, server, mountPoint } = await start();
    const v = await store.createVolume({ name: 'busy', capacityBytes: 4 * MiB });
    files.add(v.id, v.id);
    await attachLoop(path.join(mountPoint, v.id));
    await server.close();
    expect(fuseMountsAt(mountPoint)).toHaveLength(0);
    expect(server.connected).toBe(false);
  });

  it('a mount left by a killed server is cleaned by the next start, and what it fsynced survives', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fuse-test-'));
    dirs.push(dir);
    const mountPoint = path.join(dir, 'mnt');
    fs.mkdirSync(mountPoint);
    const storeDir = path.join(dir, 'store');
    const child = spawn(process.execPath, ['--import', 'tsx', childScript, storeDir, mountPoint, String(8 * MiB)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    children.push(child);
    const first = await new Promise<string>((resolve, reject) => {
      const rl = createInterface({ input: child.stdout! });
      rl.once('line', resolve);
      child.once('exit', (code) => reject(new Error(`fuse child exited early (${code})`)));
    });
    const { volumeId, file } = JSON.parse(first) as { volumeId: string; file: string };

    const synced = pattern(13, 8 * BLOCK);
    const fh = await fsp.open(file, fs.constants.O_RDWR);
    await fh.write(synced, 0, synced.length, 3 * BLOCK);
    await fh.sync();
    await fh.close();

    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
    expect(fuseMountsAt(mountPoint)).toHaveLength(1);
    await expect(fsp.stat(mountPoint)).rejects.toMatchObject({ code: 'ENOTCONN' });

    const store = BlockStore.open(storeDir);
    const files = new VolumeFiles(store);
    const server = await FuseServer.mount(mountPoint, files);
    h = { dir, mountPoint, storeDir, store, files, server, flushes: [] };
    expect(fuseMountsAt(mountPoint)).toHaveLength(1);
    expect(store.read(volumeId, 3 * BLOCK, synced.length).equals(synced)).toBe(true);
    files.add(volumeId, volumeId);
    expect(await fsp.readdir(mountPoint)).toEqual([volumeId]);
    const back = Buffer.alloc(synced.length);
    const again = await fsp.open(path.join(mountPoint, volumeId), 'r');
    await again.read(back, 0, back.length, 3 * BLOCK);
    await again.close();
    expect(back.equals(synced)).toBe(true);
  });
});
