/** Filling a store's disk through the engine, and fingerprints that show nothing stored changed. */
import { createHash } from 'node:crypto';
import { NoSpaceError, type BlockStore } from '../../storage-engine/index.js';

export const MiB = 1024 * 1024;

/** 1 MiB of bytes derived from (seed, index) by xorshift32, so every chunk differs. */
export function chunk(seed: number, index: number): Buffer {
  const words = new Uint32Array(MiB / 4);
  let x = (Math.imul(seed, 2654435761) ^ Math.imul(index + 1, 40503)) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return Buffer.from(words.buffer);
}

/** Writes `mib` MiB from `offset` and flushes. */
export async function writeChunks(
  store: BlockStore,
  volumeId: string,
  offset: number,
  mib: number,
  seed: number,
): Promise<void> {
  for (let i = 0; i < mib; i++) store.write(volumeId, offset + i * MiB, chunk(seed, i));
  await store.flush(volumeId);
}

/**
 * Writes 1 MiB chunks into the volume from its start until the disk refuses one with NoSpaceError, then
 * flushes what was written. Returns the MiB written in full.
 */
export async function fillUntilFull(store: BlockStore, volumeId: string, seed: number): Promise<number> {
  const capacity = store.getVolume(volumeId).capacityBytes;
  let written = 0;
  for (; (written + 1) * MiB <= capacity; written++) {
    try {
      store.write(volumeId, written * MiB, chunk(seed, written));
    } catch (err) {
      if (err instanceof NoSpaceError) break;
      throw err;
    }
    if (written % 8 === 7) await store.flush(volumeId);
  }
  if ((written + 1) * MiB > capacity) throw new Error(`volume ${volumeId} is too small to fill the disk`);
  await store.flush(volumeId);
  return written;
}

/** Whether an error says the disk is full, as the engine reports it now (NoSpaceError) or as SQLite did before. */
function isFull(err: unknown): boolean {
  return err instanceof NoSpaceError || (err as { code?: unknown } | null)?.code === 'SQLITE_FULL';
}

/**
 * Fills what room the catalog has left: trims one block of the volume at a time, each flush appending a
 * journal row, until a flush fails because the disk is full. Returns the flushes that succeeded. The
 * volume's last trim stays unflushed (its bits are dirty), as a volume's would be on a full disk.
 */
export async function exhaustCatalog(store: BlockStore, volumeId: string, maxFlushes = 20_000): Promise<number> {
  const { blockSize, capacityBytes } = store.getVolume(volumeId);
  for (let n = 0; n < maxFlushes; n++) {
    // Every other block, so no trim merges with the one before it into the same run.
    store.trim(volumeId, (2 * n * blockSize) % capacityBytes, blockSize);
    try {
      await store.flush(volumeId);
    } catch (err) {
      if (isFull(err)) return n;
      throw err;
    }
  }
  throw new Error(`the catalog still had room after ${maxFlushes} flushes`);
}

/** SHA-256 of a byte range of a snapshot or a volume, read through the store. */
export function fingerprint(
  store: BlockStore,
  what: { snapshotId: string } | { volumeId: string },
  length: number,
): string {
  const hash = createHash('sha256');
  for (let off = 0; off < length; off += 4 * MiB) {
    const n = Math.min(4 * MiB, length - off);
    hash.update('snapshotId' in what ? store.readSnapshot(what.snapshotId, off, n) : store.read(what.volumeId, off, n));
  }
  return hash.digest('hex');
}
