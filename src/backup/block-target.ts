/**
 * Block devices and image files as sources (backup) and targets (restore): open, size, positioned reads
 * and writes. A block device's size comes from sysfs, since stat() reports 0 for it.
 */
import fs from 'node:fs';
import { DIRECT_ALIGN } from '../aligned-memory.js';
import { directCapable, reopenDirect } from './direct-io.js';
import { RepositoryError } from './repository.js';

/** The size in bytes of a regular file or a block device. */
export function sizeOf(file: string, st: fs.Stats): number {
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) {
    const rdev = st.rdev;
    const major = Math.floor(rdev / 256) & 0xfff;
    const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & ~0xff & 0xfffff);
    const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
    return sectors * 512;
  }
  throw new RepositoryError('usage', `${file} is neither a regular file nor a block device`);
}

/** Something bytes are read from during a backup. */
export interface BlockSource {
  readonly path: string;
  readonly size: number;
  /** Page-aligned buffers (allocAligned) are read with O_DIRECT: a block device that allows it. */
  readonly direct: boolean;
  read(offset: number, length: number): Promise<Buffer>;
  /** Fills `into` with the bytes at `offset`. */
  readInto(into: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
}

/** Opens a device or image file for reading; refuses one smaller than `capacityBytes`. */
export async function openSource(file: string, capacityBytes: number): Promise<BlockSource> {
  // Opened once; its size is checked and every byte read through that descriptor (or one re-opened from
  // it), so a path swapped meanwhile cannot make the backup read another file.
  // O_NONBLOCK: a FIFO is opened at once (and refused below) instead of waiting, unkillably, for a writer;
  // files and block devices ignore it.
  const handle = await fs.promises
    .open(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK)
    .catch((err: NodeJS.ErrnoException) => {
      throw new RepositoryError(
        'usage',
        `source ${file} cannot be opened: ${err.code === 'ENOENT' ? 'it does not exist' : err.message}`,
      );
    });
  let direct: fs.promises.FileHandle | undefined;
  let size: number;
  try {
    const st = await handle.stat();
    size = sizeOf(file, st);
    if (size < capacityBytes) {
      throw new RepositoryError(
        'usage',
        `source ${file} has ${size} bytes but the snapshot has ${capacityBytes}: it is not a copy of this snapshot`,
      );
    }
    // A block device is read with O_DIRECT into page-aligned chunk buffers: the device's page cache would
    // only add a copy, and a backup's reads are not read again.
    if (st.isBlockDevice()) direct = await reopenDirect(handle, fs.constants.O_RDONLY);
  } catch (err) {
    await handle.close();
    throw err;
  }
  const readInto = async (into: Buffer, offset: number): Promise<void> => {
    const length = into.length;
    const from = direct && directCapable(into) && offset % DIRECT_ALIGN === 0 ? direct : handle;
    let done = 0;
    while (done < length) {
      const { bytesRead } = await from.read(into, done, length - done, offset + done);
      if (bytesRead === 0) throw new Error(`source ${file} ended at ${offset + done}, before ${offset + length}`);
      done += bytesRead;
    }
  };
  return {
    path: file,
    size,
    direct: direct !== undefined,
    async read(offset, length) {
      const buf = Buffer.allocUnsafe(length);
      await readInto(buf, offset);
      return buf;
    },
    readInto,
    close: async () => {
      await direct?.close();
      direct = undefined;
      await handle.close();
    },
  };
}

/** Why a target could not be opened, in words. */
function openProblem(err: NodeJS.ErrnoException): string {
  if (err.code === 'ELOOP') return 'it is a symbolic link';
  if (err.code === 'ENOENT') return 'its directory does not exist';
  if (err.code === 'EEXIST') return 'something appeared at that path meanwhile';
  if (err.code === 'EBUSY')
    return 'it is in use (mounted, or opened exclusively by another program): unmount it or give another device';
  return err.message;
}

/** Where a restore writes. `created`: the command made the file (so it is all zeros to start with). */
export interface RestoreTarget {
  readonly path: string;
  readonly created: boolean;
  /** Aligned writes of page-aligned buffers (allocAligned) go with O_DIRECT: the target allows it. */
  readonly direct: boolean;
  write(offset: number, data: Buffer): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Opens a restore target: an absent path becomes a new 0600 image file of `capacityBytes`; an existing
 * file or device must hold at least `capacityBytes` (its first `capacityBytes` are overwritten).
 */
export async function openTarget(file: string, capacityBytes: number): Promise<RestoreTarget> {
  const st = await fs.promises.lstat(file).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  let handle: fs.promises.FileHandle;
  let created = false;
  if (!st) {
    // O_EXCL: a name that appeared meanwhile (a symlink too) is refused, not followed.
    handle = await fs.promises
      .open(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600)
      .catch((err: NodeJS.ErrnoException) => {
        throw new RepositoryError('usage', `target ${file} cannot be created: ${openProblem(err)}`);
      });
    try {
      // open()'s mode is filtered by the umask.
      await handle.chmod(0o600);
      await handle.truncate(capacityBytes);
    } catch (err) {
      await handle.close();
      await fs.promises.rm(file, { force: true });
      throw err;
    }
    created = true;
  } else {
    if (st.isSymbolicLink())
      throw new RepositoryError('usage', `target ${file} is a symbolic link: give the device or file itself`);
    // Only a file or device (sizeOf refuses the rest before an open could block on a FIFO).
    sizeOf(file, st);
    // What is opened is checked, not the path: one swapped since the lstat (for a symlink, say) is refused.
    // A block device is opened exclusively: Linux refuses that (EBUSY) while a filesystem on it is mounted,
    // which a restore would corrupt under the kernel's feet.
    const exclusive = st.isBlockDevice() ? fs.constants.O_EXCL : 0;
    handle = await fs.promises
      .open(file, fs.constants.O_WRONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK | exclusive)
      .catch((err: NodeJS.ErrnoException) => {
        throw new RepositoryError('usage', `target ${file} cannot be opened: ${openProblem(err)}`);
      });
    try {
      const opened = await handle.stat();
      if (opened.dev !== st.dev || opened.ino !== st.ino)
        throw new RepositoryError(
          'usage',
          `target ${file} was replaced while it was being opened; nothing was written`,
        );
      const size = sizeOf(file, opened);
      if (size < capacityBytes) {
        throw new RepositoryError(
          'usage',
          `target ${file} has ${size} bytes, smaller than the backed-up volume's ${capacityBytes}`,
        );
      }
    } catch (err) {
      await handle.close();
      throw err;
    }
  }
  // Aligned writes of aligned buffers go with O_DIRECT: a restored volume is not read back soon, and its
  // bytes in the page cache would only be copied there and flushed later.
  let direct = await reopenDirect(handle, fs.constants.O_WRONLY);
  const writeAll = async (through: fs.promises.FileHandle, offset: number, data: Buffer) => {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await through.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  };
  return {
    path: file,
    created,
    get direct() {
      return direct !== undefined;
    },
    async write(offset, data) {
      const through = direct;
      if (through && directCapable(data) && offset % DIRECT_ALIGN === 0) {
        try {
          return await writeAll(through, offset, data);
        } catch (err) {
          // A filesystem that opens with O_DIRECT but refuses the write: the page cache from now on. Several
          // writes under way may be refused; the first to hear it closes the descriptor.
          if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
          if (direct === through) {
            direct = undefined;
            await through.close();
          }
        }
      }
      await writeAll(handle, offset, data);
    },
    // One fsync covers both descriptors: it flushes the file (or device) they share.
    sync: () => handle.sync(),
    close: async () => {
      await direct?.close();
      direct = undefined;
      await handle.close();
    },
  };
}
