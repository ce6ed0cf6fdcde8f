/**
 * Chunk files written with O_DIRECT: the bytes go from the backup's buffer to the disk without being copied
 * into the page cache first. That copy was the largest CPU cost of a full backup after SHA-256 (~1.5 s per
 * GiB on the dev VM, against ~0.2 s direct), and a backup's chunks are not read again soon, so caching them
 * only pushes other data out. O_DIRECT needs the buffer's address, the file offset and the length aligned to
 * the disk's logical block size; Node gives no say over a Buffer's address, but a WebAssembly.Memory is
 * page-aligned (src/aligned-memory.ts), so chunk buffers are cut from one. Where any of this is unavailable
 * (no WebAssembly, a filesystem without O_DIRECT such as tmpfs, an odd length) the write falls back to the
 * page cache.
 */
import fs from 'node:fs';
import { DIRECT_ALIGN, pageAlignedMemory } from '../aligned-memory.js';

/** Backing stores of the buffers allocAligned() made. */
const alignedStores = new WeakSet<ArrayBuffer | SharedArrayBuffer>();

/**
 * `count` page-aligned buffers of `size` bytes each (a multiple of DIRECT_ALIGN), or ordinary buffers when
 * WebAssembly is unavailable (node --jitless). They are shared memory, so worker threads can hash them in
 * place (sha256-threads.ts).
 */
export function allocAligned(size: number, count: number): Buffer[] {
  if (size % DIRECT_ALIGN !== 0) throw new RangeError(`aligned buffers come in multiples of ${DIRECT_ALIGN} bytes`);
  const store = pageAlignedMemory(size * count, true);
  if (!store) return Array.from({ length: count }, () => Buffer.allocUnsafeSlow(size));
  alignedStores.add(store);
  return Array.from({ length: count }, (_, i) => Buffer.from(store, i * size, size));
}

/** Whether `data` can be written or read with O_DIRECT: an aligned buffer's aligned start, a whole number of pages. */
export function directCapable(data: Buffer): boolean {
  return (
    alignedStores.has(data.buffer) &&
    data.byteOffset % DIRECT_ALIGN === 0 &&
    data.length % DIRECT_ALIGN === 0 &&
    data.length > 0
  );
}

/**
 * Creates `file` (it must not exist) with mode `mode` holding `data`, with O_DIRECT when `direct` and the
 * buffer allows. Returns whether O_DIRECT was used; a filesystem that refuses it (EINVAL) gets the bytes
 * through the page cache instead and `false`, so the caller can stop trying.
 */
export async function createFile(file: string, data: Buffer, mode: number, direct: boolean): Promise<boolean> {
  const flags = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL;
  if (direct && directCapable(data)) {
    try {
      await writeWhole(file, flags | fs.constants.O_DIRECT, data, mode);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
      await fs.promises.rm(file, { force: true });
    }
    await writeWhole(file, flags, data, mode);
    return false;
  }
  await writeWhole(file, flags, data, mode);
  return direct;
}

async function writeWhole(file: string, flags: number, data: Buffer, mode: number): Promise<void> {
  const handle = await fs.promises.open(file, flags, mode);
  try {
    for (let done = 0; done < data.length; ) done += (await handle.write(data, done, data.length - done)).bytesWritten;
    // open()'s mode is filtered by the umask.
    await handle.chmod(mode);
  } finally {
    await handle.close();
  }
}

/** A file too large for the buffer it was to be read into. */
export class FileTooLarge extends Error {
  constructor(
    readonly file: string,
    readonly size: number,
  ) {
    super(`${file} holds ${size} bytes, more than expected`);
  }
}

/**
 * Reads the whole of `file` into the start of `into` and returns its bytes, a view of `into`: with O_DIRECT
 * when the buffer allows (the read is rounded up to whole pages; the file's end stops it), through the page
 * cache where the filesystem refuses O_DIRECT or the buffer is not aligned. A file longer than `into` throws
 * FileTooLarge.
 */
export async function readFileInto(file: string, into: Buffer): Promise<Buffer> {
  if (directCapable(into)) {
    const handle = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_DIRECT).catch((err) => {
      if ((err as NodeJS.ErrnoException).code === 'EINVAL') return undefined;
      throw err;
    });
    if (handle) {
      try {
        return await readWhole(handle, file, into, DIRECT_ALIGN);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
      } finally {
        await handle.close();
      }
    }
  }
  const handle = await fs.promises.open(file, 'r');
  try {
    return await readWhole(handle, file, into, 1);
  } finally {
    await handle.close();
  }
}

/**
 * `handle`'s file opened once more, with O_DIRECT (`access`: O_RDONLY or O_WRONLY), or undefined where the
 * filesystem refuses it. Opened through /proc/self/fd, not the path: the path may have been swapped (for a
 * symlink, say) since `handle` was opened and checked, and the bytes must go to and come from that file.
 */
export function reopenDirect(
  handle: fs.promises.FileHandle,
  access: number,
): Promise<fs.promises.FileHandle | undefined> {
  return fs.promises.open(`/proc/self/fd/${handle.fd}`, access | fs.constants.O_DIRECT).catch(() => undefined);
}

async function readWhole(handle: fs.promises.FileHandle, file: string, into: Buffer, align: number): Promise<Buffer> {
  const { size } = await handle.stat();
  if (size > into.length) throw new FileTooLarge(file, size);
  const want = Math.min(into.length, Math.ceil(size / align) * align);
  let done = 0;
  while (done < size) {
    const { bytesRead } = await handle.read(into, done, want - done, done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return into.subarray(0, Math.min(done, size));
}
