/** One backup's manifest: what was backed up, from which base, and which chunk holds each stored range. */

/**
 * Format 2 adds the chunk offset to each extent, so small extents can share a chunk. Format 1 manifests
 * (three-element extents, each a whole chunk) are still read: their chunk offset is 0.
 */
export const MANIFEST_FORMAT = 2;
const READABLE_FORMATS: readonly number[] = [1, 2];

/**
 * A stored range of the volume: `length` bytes at `offset`, held by the chunk named `sha256` from byte
 * `chunkOffset` of that chunk on.
 */
export type ManifestExtent = [offset: number, length: number, sha256: string, chunkOffset: number];

export interface Manifest {
  format: 1 | 2;
  /** The backup's ID (also its file name). */
  id: string;
  /** The CSI snapshot ID it was taken from. */
  snapshot: string;
  /** The CSI volume the snapshot was taken of, when known (used to refuse a base of another volume). */
  sourceVolume: string | null;
  /** The backup this one is an increment on; null for a full backup. */
  base: string | null;
  /** Volume size in bytes at this backup. */
  capacityBytes: number;
  /** Largest chunk; no extent crosses a multiple of it. */
  blockSize: number;
  /** Stored ranges in increasing order; ranges not listed are unchanged from the base (zero for a full backup). */
  extents: ManifestExtent[];
  /** Bytes read and stored (sum of extent lengths). */
  bytes: number;
  created: string;
  toolVersion: string;
}

export const SHA256_HEX = /^[0-9a-f]{64}$/;
/** UTC time of the start to the millisecond (so IDs sort by age), then random. */
export const BACKUP_ID = /^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}$/;

/** Parses and checks a manifest file's text; throws with what is wrong. */
export function parseManifest(text: string, expectedId: string): Manifest {
  const m = JSON.parse(text) as Partial<Manifest>;
  const fail = (what: string): never => {
    throw new Error(`manifest ${expectedId} is damaged: ${what}`);
  };
  if (!READABLE_FORMATS.includes(m.format as number)) fail(`unknown format ${String(m.format)}`);
  if (m.id !== expectedId) fail(`it names itself ${String(m.id)}`);
  if (typeof m.snapshot !== 'string' || !m.snapshot) fail('no snapshot');
  if (m.base !== null && (typeof m.base !== 'string' || !BACKUP_ID.test(m.base))) fail('bad base');
  if (!Number.isSafeInteger(m.capacityBytes) || m.capacityBytes! <= 0) fail('bad capacity');
  if (!Number.isSafeInteger(m.blockSize) || m.blockSize! <= 0) fail('bad block size');
  if (!Array.isArray(m.extents)) fail('no extents');
  let end = 0;
  const arity = m.format === 1 ? 3 : 4;
  for (const e of m.extents!) {
    if (!Array.isArray(e) || e.length !== arity) fail('bad extent');
    const [offset, length, hash] = e;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || length <= 0 || offset < end)
      fail(`extent at ${offset} out of order`);
    if (offset + length > m.capacityBytes!) fail(`extent at ${offset} beyond the capacity`);
    if (typeof hash !== 'string' || !SHA256_HEX.test(hash)) fail(`extent at ${offset} names no chunk`);
    if (arity === 3) (e as unknown[]).push(0);
    else if (!Number.isSafeInteger(e[3]) || e[3] < 0) fail(`extent at ${offset} has a bad chunk offset`);
    end = offset + length;
  }
  return m as Manifest;
}
