/**
 * How large a volume the store can hold, and how much room is left. Block i of a layer lives at byte
 * i × B of one sparse file, so a volume can be no larger than the biggest file the state filesystem
 * allows (ext4 with 4 KiB blocks: 16 TiB − 4 KiB), whatever the engine's own 2^32-block bound says.
 * That size is probed once when a store opens, since statfs does not report it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { OutOfRangeError } from './errors.js';
import { MAX_BLOCKS, MAX_BLOCK_SIZE } from './validate.js';

/** Largest size the engine could ever ask of a file: 2^32 blocks of 1 MiB (2^52 bytes, exact in a Number). */
export const MAX_ADDRESSABLE_BYTES = MAX_BLOCKS * MAX_BLOCK_SIZE;

/** Scratch file of the probe, in the store directory; a crash mid-probe leaves it for the next open to remove. */
export const PROBE_FILE = '.max-file-size-probe';

/** What the filesystem under a store can hold. */
export interface FileSystemLimits {
  /** The directory the limits were measured in. */
  dir: string;
  /** The filesystem's name (from its statfs magic), e.g. "ext4", or "filesystem 0x…" if unknown. */
  type: string;
  /** The largest file size the filesystem accepts, capped at MAX_ADDRESSABLE_BYTES. */
  maxFileBytes: number;
}

/** The rules' inputs besides the filesystem: the store's own provisioning limit and what it has provisioned. */
export interface ProvisioningState {
  capacityLimitBytes: number | undefined;
  provisionedBytes: number;
}

/** What a store can offer volumes of one block size. */
export interface StoreCapacity {
  /**
   * Bytes that can still be provisioned: with a provisioning limit, what is left under it; without one
   * (volumes are thin), the free space of the store's filesystem, which writes can still fill.
   * Rounded down to the block size.
   */
  availableBytes: number;
  /** The largest volume that can be created now (0 if none): see maximumVolumeBytes(). */
  maximumVolumeBytes: number;
}

/**
 * The largest file the filesystem holding `dir` accepts: a binary search with ftruncate of a scratch
 * file (the kernel refuses a size past the filesystem's s_maxbytes with EFBIG, or EINVAL). Sparse, so no
 * space is used; about 50 ftruncate calls at most, one if the filesystem holds MAX_ADDRESSABLE_BYTES.
 */
export function probeFileSystem(dir: string): FileSystemLimits {
  const file = path.join(dir, PROBE_FILE);
  fs.rmSync(file, { force: true });
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  let maxFileBytes: number;
  try {
    const fits = (bytes: number): boolean => {
      try {
        fs.ftruncateSync(fd, bytes);
        return true;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // ENOSPC/EDQUOT: a filesystem that cannot make sparse files of that size cannot hold such a layer either.
        if (code === 'EFBIG' || code === 'EINVAL' || code === 'ENOSPC' || code === 'EDQUOT') return false;
        throw err;
      }
    };
    if (fits(MAX_ADDRESSABLE_BYTES)) {
      maxFileBytes = MAX_ADDRESSABLE_BYTES;
    } else {
      // Invariant: `low` fits, `high` does not.
      let low = 0;
      let high = MAX_ADDRESSABLE_BYTES;
      while (high - low > 1) {
        const mid = low + Math.floor((high - low) / 2);
        if (fits(mid)) low = mid;
        else high = mid;
      }
      maxFileBytes = low;
    }
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
  return { dir, type: fileSystemName(fs.statfsSync(dir).type), maxFileBytes };
}

/**
 * The largest volume of `blockSize`-byte blocks the store can hold: at most 2^32 blocks (the bitmaps'
 * bound), its last block wholly inside the largest file the filesystem allows, and, with a provisioning
 * limit, no more than what is left under it.
 */
export function maximumVolumeBytes(limits: FileSystemLimits, state: ProvisioningState, blockSize: number): number {
  let largest = Math.min(MAX_BLOCKS * blockSize, roundDown(limits.maxFileBytes, blockSize));
  if (state.capacityLimitBytes !== undefined) {
    largest = Math.min(largest, roundDown(Math.max(0, state.capacityLimitBytes - state.provisionedBytes), blockSize));
  }
  return largest;
}

/**
 * OUT_OF_RANGE for a capacity the layer files cannot address on this filesystem. (A capacity past the
 * provisioning limit is a different refusal, NoSpaceError, checked where volumes are provisioned.)
 */
export function checkAddressable(limits: FileSystemLimits, capacityBytes: number, blockSize: number): void {
  const largest = Math.min(MAX_BLOCKS * blockSize, roundDown(limits.maxFileBytes, blockSize));
  if (capacityBytes > largest) {
    throw new OutOfRangeError(
      `capacity ${capacityBytes} is more than ${largest} bytes, the largest volume of ${blockSize}-byte blocks ` +
        `this store can address: ${largest === MAX_BLOCKS * blockSize ? `${MAX_BLOCKS} blocks` : `the ${limits.type} filesystem at ${limits.dir} holds files of at most ${limits.maxFileBytes} bytes`}`,
    );
  }
}

/** What GetCapacity-style questions get: room left and the largest volume, for one block size. */
export function storeCapacity(limits: FileSystemLimits, state: ProvisioningState, blockSize: number): StoreCapacity {
  let available: number;
  if (state.capacityLimitBytes !== undefined) {
    available = Math.max(0, state.capacityLimitBytes - state.provisionedBytes);
  } else {
    const stats = fs.statfsSync(limits.dir);
    available = stats.bavail * stats.bsize;
  }
  return {
    availableBytes: roundDown(available, blockSize),
    maximumVolumeBytes: maximumVolumeBytes(limits, state, blockSize),
  };
}

function roundDown(bytes: number, blockSize: number): number {
  return Math.floor(bytes / blockSize) * blockSize;
}

/** statfs f_type magic numbers of filesystems a store is likely to sit on (linux/magic.h). */
const FILE_SYSTEM_NAMES: ReadonlyMap<number, string> = new Map([
  [0xef53, 'ext4'],
  [0x58465342, 'xfs'],
  [0x9123683e, 'btrfs'],
  [0x01021994, 'tmpfs'],
  [0x794c7630, 'overlayfs'],
  [0x2fc12fc1, 'zfs'],
  [0xf2f52010, 'f2fs'],
  [0x6969, 'nfs'],
  [0x65735546, 'fuse'],
  [0x4d44, 'vfat'],
]);

/** A filesystem's name from its statfs type (ext2, ext3 and ext4 share one magic; ext4 is what is met today). */
export function fileSystemName(type: number): string {
  return FILE_SYSTEM_NAMES.get(type) ?? `filesystem 0x${type.toString(16)}`;
}
