/**
 * The location index answers exactly what a plain per-block array would, whatever sequence of assignments,
 * trims (null), relabels and clones it sees, and its runs stay sorted, disjoint and joined.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { LocationIndex } from '../../storage-engine/location-index.js';

interface Owner {
  name: string;
}
const OWNERS: Owner[] = Array.from({ length: 5 }, (_, i) => ({ name: `L${i}` }));
const BLOCKS = 3000;

type Op =
  | { kind: 'assign'; first: number; length: number; owner: number | null }
  | { kind: 'relabel'; from: number; to: number }
  | { kind: 'clone' };

const op: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 8,
    arbitrary: fc.record({
      kind: fc.constant('assign' as const),
      first: fc.integer({ min: 0, max: BLOCKS - 1 }),
      length: fc.oneof(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 1200 })),
      owner: fc.option(fc.integer({ min: 0, max: OWNERS.length - 1 }), { freq: 4 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('relabel' as const),
      from: fc.integer({ min: 0, max: OWNERS.length - 1 }),
      to: fc.integer({ min: 0, max: OWNERS.length - 1 }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: 'clone' as const }) },
);

function checkAgainst(index: LocationIndex<Owner>, model: (Owner | null)[]): void {
  for (let b = 0; b < BLOCKS; ) {
    const { owner, end: stretchEnd } = index.lookup(b);
    expect(owner, `block ${b}`).toBe(model[b]);
    // Every block up to the stretch's end has the same answer.
    const end = Math.min(stretchEnd, BLOCKS);
    expect(end).toBeGreaterThan(b);
    for (let k = b + 1; k < end; k++) if (model[k] !== owner) expect(model[k], `block ${k}`).toBe(owner);
    if (stretchEnd < BLOCKS && owner !== null) expect(model[stretchEnd]).not.toBe(owner);
    b = end;
  }
  let prevEnd = -1;
  let prevOwner: Owner | undefined;
  for (const r of index.runs()) {
    expect(r.start).toBeGreaterThanOrEqual(prevEnd);
    expect(r.end).toBeGreaterThan(r.start);
    if (r.start === prevEnd) expect(r.owner, 'touching runs of one owner are joined').not.toBe(prevOwner);
    prevEnd = r.end;
    prevOwner = r.owner;
  }
  for (const o of OWNERS) expect(index.holds(o)).toBe(model.includes(o));
}

describe('location index', () => {
  it('answers every block as a per-block array would, after any sequence of changes', () => {
    fc.assert(
      fc.property(fc.array(op, { maxLength: 120 }), (ops) => {
        let index = new LocationIndex<Owner>();
        let model: (Owner | null)[] = new Array(BLOCKS).fill(null);
        for (const o of ops) {
          if (o.kind === 'assign') {
            const end = Math.min(BLOCKS, o.first + o.length);
            const owner = o.owner === null ? null : OWNERS[o.owner]!;
            index.assign(o.first, end, owner);
            for (let b = o.first; b < end; b++) model[b] = owner;
          } else if (o.kind === 'relabel') {
            const from = OWNERS[o.from]!;
            const to = OWNERS[o.to]!;
            if (from === to) continue;
            index.relabel(from, to);
            model = model.map((m) => (m === from ? to : m));
          } else {
            const copy = index.clone();
            // The original is changed afterwards; the copy must not see it.
            index.assign(0, BLOCKS, OWNERS[0]!);
            index = copy;
          }
        }
        checkAgainst(index, model);
      }),
      { numRuns: 150 },
    );
  });

  it('splits into chunks under many scattered runs and still answers exactly', () => {
    const index = new LocationIndex<Owner>();
    const model: (Owner | null)[] = new Array(BLOCKS).fill(null);
    for (let b = 0; b < BLOCKS; b += 2) {
      const owner = OWNERS[(b / 2) % OWNERS.length]!;
      index.assign(b, b + 1, owner);
      model[b] = owner;
    }
    expect(index.size).toBe(BLOCKS / 2);
    index.assign(100, 2900, null);
    for (let b = 100; b < 2900; b++) model[b] = null;
    checkAgainst(index, model);
  });

  it('costs one run for a volume written end to end by one layer, whatever its size', () => {
    const index = new LocationIndex<Owner>();
    const blocks = 2 ** 32 - 1;
    for (let b = 0; b < blocks; b += 2 ** 20) index.assign(b, Math.min(blocks, b + 2 ** 20), OWNERS[1]!);
    expect(index.size).toBe(1);
    expect(index.lookup(blocks - 1)).toEqual({ owner: OWNERS[1], end: blocks });
  });

  it('builds from sorted runs, joining touching runs of one owner', () => {
    const a = OWNERS[0]!;
    const b = OWNERS[1]!;
    const index = LocationIndex.fromSortedRuns([
      { start: 0, end: 4, owner: a },
      { start: 4, end: 8, owner: a },
      { start: 8, end: 9, owner: b },
      { start: 20, end: 30, owner: a },
    ]);
    expect([...index.runs()]).toEqual([
      { start: 0, end: 8, owner: a },
      { start: 8, end: 9, owner: b },
      { start: 20, end: 30, owner: a },
    ]);
    expect(index.lookup(10)).toEqual({ owner: null, end: 20 });
  });
});
