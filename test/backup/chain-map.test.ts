/**
 * The volume a chain of backups leaves: every byte comes from the latest backup that stored it, bytes no
 * backup stored are absent (restored as zeros), nothing reaches past the restored capacity, and the ranges
 * come sorted and disjoint, so a restore can write each byte once, in order. Checked against replaying the
 * chain byte by byte.
 */
import fc from 'fast-check';
import { expect, it } from 'vitest';
import { layChain } from '../../src/backup/chain-map.js';
import type { Manifest, ManifestExtent } from '../../src/backup/manifest.js';

function manifest(id: string, capacityBytes: number, extents: ManifestExtent[]): Manifest {
  return {
    format: 2,
    id,
    snapshot: id,
    sourceVolume: null,
    base: null,
    capacityBytes,
    blockSize: 64,
    extents,
    bytes: extents.reduce((s, e) => s + e.length, 0),
    created: '',
    toolVersion: '',
  };
}

/** A manifest's extents: sorted, disjoint, within its capacity, each in a chunk named after the backup. */
const manifestArb = (index: number) =>
  fc
    .record({
      capacity: fc.integer({ min: 1, max: 200 }),
      cuts: fc.uniqueArray(fc.integer({ min: 0, max: 200 }), { maxLength: 16 }),
      chunkOffsets: fc.array(fc.integer({ min: 0, max: 50 }), { minLength: 8, maxLength: 8 }),
    })
    .map(({ capacity, cuts, chunkOffsets }) => {
      const points = [...new Set(cuts.filter((c) => c <= capacity))].sort((a, b) => a - b);
      const extents: ManifestExtent[] = [];
      // Every other gap between cut points is stored.
      for (let k = 0; k + 1 < points.length; k += 2)
        extents.push([points[k]!, points[k + 1]! - points[k]!, `chunk-${index}-${k}`, chunkOffsets[k % 8]!]);
      return manifest(`m${index}`, capacity, extents);
    });

/** Byte by byte: which chunk byte ends up at each volume byte, replaying the chain in order. */
function replay(chain: Manifest[], capacity: number): (string | undefined)[] {
  const bytes: (string | undefined)[] = new Array(capacity).fill(undefined);
  for (const m of chain)
    for (const [offset, length, hash, chunkOffset] of m.extents)
      for (let b = 0; b < length; b++) if (offset + b < capacity) bytes[offset + b] = `${hash}@${chunkOffset + b}`;
  return bytes;
}

it('every byte comes from the latest backup that stored it; ranges are sorted, disjoint and within the capacity', () => {
  fc.assert(
    fc.property(
      fc.array(fc.nat(), { minLength: 1, maxLength: 5 }).chain((ids) => fc.tuple(...ids.map((_, i) => manifestArb(i)))),
      (chain) => {
        const capacity = chain.at(-1)!.capacityBytes;
        const laid = layChain(chain, capacity);
        const bytes: (string | undefined)[] = new Array(capacity).fill(undefined);
        let end = 0;
        for (const p of laid) {
          expect(p.length).toBeGreaterThan(0);
          expect(p.offset).toBeGreaterThanOrEqual(end);
          end = p.offset + p.length;
          expect(end).toBeLessThanOrEqual(capacity);
          expect(p.hash.startsWith(`chunk-${p.backup.slice(1)}-`)).toBe(true);
          for (let b = 0; b < p.length; b++) bytes[p.offset + b] = `${p.hash}@${p.chunkOffset + b}`;
        }
        expect(bytes).toEqual(replay(chain, capacity));
      },
    ),
    { numRuns: 300 },
  );
});

it('an incremental splits the full backup range it lands in, keeping both sides', () => {
  const full = manifest('full', 100, [[0, 100, 'full', 0]]);
  const inc = manifest('inc', 100, [[40, 10, 'inc', 3]]);
  expect(layChain([full, inc], 100)).toEqual([
    { offset: 0, length: 40, hash: 'full', chunkOffset: 0, backup: 'full' },
    { offset: 40, length: 10, hash: 'inc', chunkOffset: 3, backup: 'inc' },
    { offset: 50, length: 50, hash: 'full', chunkOffset: 50, backup: 'full' },
  ]);
});

it('a smaller last capacity cuts what earlier backups stored beyond it', () => {
  const big = manifest('big', 100, [[0, 100, 'big', 0]]);
  const small = manifest('small', 60, []);
  expect(layChain([big, small], 60)).toEqual([{ offset: 0, length: 60, hash: 'big', chunkOffset: 0, backup: 'big' }]);
});
