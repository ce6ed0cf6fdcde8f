/**
 * The FUSE protocol logic without a kernel: requests are built byte by byte from the ABI's layouts
 * (include/uapi/linux/fuse.h) and fed to the dispatcher; replies are parsed back the same way. Also the
 * VolumeFiles rules that a mount cannot easily reach (remove while open, unsupported fallocate modes).
 * Needs neither root nor /dev/fuse.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockStore } from '../../storage-engine/index.js';
import { FuseError, type FuseFilesystem } from '../../src/dataplane/fuse/filesystem.js';
import { FuseDispatcher } from '../../src/dataplane/fuse/fuse-server.js';
import { decodeInitOut, Errno, FallocMode, InitFlag, Opcode, OpenOutFlag } from '../../src/dataplane/fuse/protocol.js';
import { VolumeFiles } from '../../src/dataplane/fuse/volume-files.js';

const ROOT = 1;

/** A fuse_in_header followed by `body`. */
function request(opcode: number, unique: bigint, nodeid: number, body: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(40);
  h.writeUInt32LE(40 + body.length, 0);
  h.writeUInt32LE(opcode, 4);
  h.writeBigUInt64LE(unique, 8);
  h.writeBigUInt64LE(BigInt(nodeid), 16);
  return Buffer.concat([h, body]);
}

/** A fuse_init_in as a 7.`minor` kernel sends it. */
function initIn(minor: number, flags: number): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(7, 0);
  b.writeUInt32LE(minor, 4);
  b.writeUInt32LE(128 * 1024, 8);
  b.writeUInt32LE(flags >>> 0, 12);
  return b;
}

interface Reply {
  len: number;
  error: number;
  unique: bigint;
  payload: Buffer;
}

function parseReply(parts: Buffer[]): Reply {
  const all = Buffer.concat(parts);
  return {
    len: all.readUInt32LE(0),
    error: all.readInt32LE(4),
    unique: all.readBigUInt64LE(8),
    payload: all.subarray(16),
  };
}

/** Dispatches one request and returns every message the dispatcher sent for it. */
async function exchange(d: FuseDispatcher, req: Buffer): Promise<Reply[]> {
  const sent: Reply[] = [];
  await d.dispatch(req, (parts) => sent.push(parseReply(parts)));
  return sent;
}

/** A file system every call of which fails the test: the dispatcher must not reach it in these cases. */
const untouchable = new Proxy({} as FuseFilesystem, {
  get: (_t, prop) => () => {
    throw new Error(`file system method ${String(prop)} must not be called`);
  },
});

async function initialised(fs: FuseFilesystem = untouchable): Promise<FuseDispatcher> {
  const d = new FuseDispatcher(fs);
  const [r] = await exchange(d, request(Opcode.INIT, 1n, 0, initIn(45, 0xffffffff)));
  expect(r?.error).toBe(0);
  return d;
}

describe('FuseDispatcher', () => {
  it('INIT grants only flags the kernel offered, at a minor version no newer than both sides speak', async () => {
    const offered = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.SPLICE_READ;
    const d = new FuseDispatcher(untouchable);
    const [r] = await exchange(d, request(Opcode.INIT, 7n, 0, initIn(30, offered)));
    expect(r).toBeDefined();
    expect(r!.error).toBe(0);
    expect(r!.unique).toBe(7n);
    expect(r!.len).toBe(16 + r!.payload.length);
    const out = decodeInitOut(r!.payload);
    expect(out.major).toBe(7);
    expect(out.minor).toBe(30);
    expect(out.flags & ~offered).toBe(0);
    expect(out.flags & InitFlag.SPLICE_READ).toBe(0);
  });

  it('INIT from a new kernel offering everything: big writes and max pages, no splice, no writeback cache', async () => {
    const d = new FuseDispatcher(untouchable);
    const [r] = await exchange(d, request(Opcode.INIT, 1n, 0, initIn(45, 0xffffffff)));
    const out = decodeInitOut(r!.payload);
    expect(out.minor).toBeLessThanOrEqual(45);
    expect(out.flags & InitFlag.BIG_WRITES).not.toBe(0);
    expect(out.flags & InitFlag.MAX_PAGES).not.toBe(0);
    for (const f of [InitFlag.SPLICE_READ, InitFlag.SPLICE_WRITE, InitFlag.SPLICE_MOVE, InitFlag.WRITEBACK_CACHE]) {
      expect(out.flags & f).toBe(0);
    }
    expect(out.maxWrite).toBeGreaterThanOrEqual(128 * 1024);
    // The kernel sizes requests by pages: max_pages must cover max_write.
    expect(out.maxPages * 4096).toBeGreaterThanOrEqual(out.maxWrite);
    // A device read must hold the largest WRITE and its two headers (40 + 40 bytes).
    expect(d.readBufferSize).toBeGreaterThanOrEqual(out.maxWrite + 80);
    await expect(d.initialized).resolves.toEqual(out);
  });

  it('INIT from a kernel of another major version is refused with EPROTO', async () => {
    const d = new FuseDispatcher(untouchable);
    const body = initIn(0, 0);
    body.writeUInt32LE(8, 0);
    const [r] = await exchange(d, request(Opcode.INIT, 1n, 0, body));
    expect(r!.error).toBe(-Errno.EPROTO);
    await expect(d.initialized).rejects.toBeInstanceOf(FuseError);
  });

  it('an opcode it does not know is answered ENOSYS, echoing the request ID', async () => {
    const d = await initialised();
    for (const opcode of [Opcode.GETXATTR, Opcode.IOCTL, Opcode.LSEEK, 9999]) {
      const replies = await exchange(d, request(opcode, 0x1234_5678_9abcn, ROOT, Buffer.alloc(64)));
      expect(replies).toEqual([{ len: 16, error: -Errno.ENOSYS, unique: 0x1234_5678_9abcn, payload: Buffer.alloc(0) }]);
    }
  });

  it('requests that change the directory are refused with EPERM', async () => {
    const d = await initialised();
    for (const opcode of [
      Opcode.CREATE,
      Opcode.MKNOD,
      Opcode.MKDIR,
      Opcode.UNLINK,
      Opcode.RENAME,
      Opcode.LINK,
      Opcode.SYMLINK,
    ]) {
      const [r] = await exchange(d, request(opcode, 5n, ROOT, Buffer.from('x\0')));
      expect(r!.error).toBe(-Errno.EPERM);
    }
  });

  it('FORGET, BATCH_FORGET and INTERRUPT get no reply', async () => {
    const forgotten: Array<[number, number]> = [];
    const fs = new Proxy({} as FuseFilesystem, {
      get: (_t, prop) =>
        prop === 'forget'
          ? (n: number, c: number) => forgotten.push([n, c])
          : () => {
              throw new Error(`unexpected ${String(prop)}`);
            },
    });
    const d = await initialised(fs);
    const forget = Buffer.alloc(8);
    forget.writeBigUInt64LE(3n);
    expect(await exchange(d, request(Opcode.FORGET, 2n, 5, forget))).toEqual([]);
    const batch = Buffer.alloc(8 + 32);
    batch.writeUInt32LE(2, 0);
    batch.writeBigUInt64LE(6n, 8);
    batch.writeBigUInt64LE(1n, 16);
    batch.writeBigUInt64LE(7n, 24);
    batch.writeBigUInt64LE(4n, 32);
    expect(await exchange(d, request(Opcode.BATCH_FORGET, 3n, 0, batch))).toEqual([]);
    const interrupt = Buffer.alloc(8);
    interrupt.writeBigUInt64LE(2n);
    expect(await exchange(d, request(Opcode.INTERRUPT, 4n, 0, interrupt))).toEqual([]);
    expect(forgotten).toEqual([
      [5, 3],
      [6, 1],
      [7, 4],
    ]);
  });

  it('a request before INIT is refused with EIO and never reaches the file system', async () => {
    const d = new FuseDispatcher(untouchable);
    const [r] = await exchange(d, request(Opcode.GETATTR, 9n, ROOT, Buffer.alloc(16)));
    expect(r!.error).toBe(-Errno.EIO);
  });

  it('a file system error is sent as the negative errno; an unexpected exception as EIO', async () => {
    const fs = new Proxy({} as FuseFilesystem, {
      get: (_t, prop) => () => {
        if (prop === 'getattr') throw new FuseError(Errno.ENOENT);
        throw new TypeError('bug');
      },
    });
    const d = await initialised(fs);
    expect((await exchange(d, request(Opcode.GETATTR, 2n, 5, Buffer.alloc(16))))[0]!.error).toBe(-Errno.ENOENT);
    expect((await exchange(d, request(Opcode.STATFS, 3n, ROOT)))[0]!.error).toBe(-Errno.EIO);
  });
});

describe('VolumeFiles', () => {
  const dirs: string[] = [];
  const stores: BlockStore[] = [];
  afterEach(async () => {
    for (const s of stores.splice(0)) await s.close();
    for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  });

  async function setup(): Promise<{ store: BlockStore; files: VolumeFiles; volumeId: string }> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'volume-files-'));
    dirs.push(dir);
    const store = BlockStore.open(dir);
    stores.push(store);
    const v = await store.createVolume({ name: 'v', capacityBytes: 1024 * 1024 });
    const files = new VolumeFiles(store);
    files.add(v.id, v.id);
    return { store, files, volumeId: v.id };
  }

  it('refuses names that could be paths or dot entries', async () => {
    const { files, volumeId } = await setup();
    for (const name of ['', '.', '..', '../x', 'a/b', '.hidden', 'x'.repeat(256), 'nul\0']) {
      expect(() => files.add(name, volumeId)).toThrow(RangeError);
    }
  });

  it('opens files for direct I/O', async () => {
    const { files, volumeId } = await setup();
    const { nodeid } = files.lookup(ROOT, volumeId);
    expect(files.open(nodeid, fs.constants.O_RDWR).openFlags & OpenOutFlag.DIRECT_IO).not.toBe(0);
  });

  it('a removed file keeps serving its open handle, and releases the volume hold only when closed and forgotten', async () => {
    const { store, files, volumeId } = await setup();
    const { nodeid } = files.lookup(ROOT, volumeId);
    const { fh } = files.open(nodeid, fs.constants.O_RDWR);
    await files.remove(volumeId);
    expect(() => files.lookup(ROOT, volumeId)).toThrow(expect.objectContaining({ errno: Errno.ENOENT }));
    expect(files.write(nodeid, fh, 0, Buffer.from('still here'))).toBe(10);
    expect(store.read(volumeId, 0, 10).toString()).toBe('still here');
    files.release(nodeid, fh);
    await expect(store.deleteVolume(volumeId)).rejects.toMatchObject({ code: 'BUSY' });
    files.forget(nodeid, 1);
    await store.deleteVolume(volumeId);
  });

  it('fallocate: preallocation and unknown modes are not supported; punching past the end is clipped', async () => {
    const { store, files, volumeId } = await setup();
    const { nodeid } = files.lookup(ROOT, volumeId);
    const { fh } = files.open(nodeid, fs.constants.O_RDWR);
    store.write(volumeId, 1024 * 1024 - 8192, Buffer.alloc(8192, 7));
    for (const mode of [
      0,
      FallocMode.KEEP_SIZE,
      0x08 /* collapse range */,
      FallocMode.PUNCH_HOLE | FallocMode.ZERO_RANGE,
    ]) {
      await expect(files.fallocate(nodeid, fh, mode, 0, 4096)).rejects.toMatchObject({ errno: Errno.EOPNOTSUPP });
    }
    await expect(files.fallocate(nodeid, fh, FallocMode.ZERO_RANGE, 1024 * 1024 - 4096, 8192)).rejects.toMatchObject({
      errno: Errno.EFBIG,
    });
    await files.fallocate(nodeid, fh, FallocMode.PUNCH_HOLE | FallocMode.KEEP_SIZE, 1024 * 1024 - 4096, 1 << 30);
    expect(
      store.read(volumeId, 1024 * 1024 - 8192, 8192).equals(Buffer.concat([Buffer.alloc(4096, 7), Buffer.alloc(4096)])),
    ).toBe(true);
  });

  it('a size change to something the store cannot address (not whole blocks) is EINVAL', async () => {
    const { files, volumeId } = await setup();
    const { nodeid } = files.lookup(ROOT, volumeId);
    await expect(files.setattr(nodeid, { size: 1024 * 1024 + 100 })).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(files.setattr(nodeid, { mode: 0o666 })).rejects.toMatchObject({ errno: Errno.EPERM });
  });
});
