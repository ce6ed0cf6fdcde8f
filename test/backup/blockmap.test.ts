/**
 * The block map is readable at a glance for a 64 MiB and a 16 TiB volume alike: byte axis labels that fit
 * the capacity, a legend, and any change visible (a single 4 KiB block colours its cell, however large).
 */
import { describe, expect, it } from 'vitest';
import { cellShares, colourOf, renderBlockmap } from '../../src/backup/blockmap.js';

const MiB = 2 ** 20;
const TiB = 2 ** 40;

function labels(svg: string): string[] {
  return [...svg.matchAll(/<text [^>]*font-size="10">([^<]+)<\/text>/g)].map((m) => m[1]!);
}

describe('blockmap', () => {
  it('labels a 64 MiB volume in MiB and a 16 TiB one in TiB, from 0 to the capacity', () => {
    const small = renderBlockmap(
      [{ label: 's1', note: 'allocated', capacityBytes: 64 * MiB, extents: [{ offset: 0, length: MiB }] }],
      't',
    );
    expect(labels(small)).toEqual(['0', '16M', '32M', '48M', '64M']);
    const big = renderBlockmap(
      [{ label: 's1', note: 'allocated', capacityBytes: 16 * TiB, extents: [{ offset: 0, length: 4096 }] }],
      't',
    );
    expect(labels(big)).toEqual(['0', '4T', '8T', '12T', '16T']);
    for (const svg of [small, big]) {
      for (const legend of ['no change', '≤ 1%', '≤ 10%', '≤ 50%', '&gt; 50%']) expect(svg).toContain(legend);
      expect(svg).toContain('byte offset in the volume');
      expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
      // Announced by screen readers and viewers: the picture has a title element.
      expect(svg).toMatch(/<svg [^>]*role="img"[^>]*>\n<title>[^<]+<\/title>/);
    }
  });

  it('a single 4 KiB change in a 64 GiB cell of a 16 TiB volume is coloured, untouched cells are not', () => {
    const shares = cellShares([{ offset: 5 * TiB, length: 4096 }], 16 * TiB, 256);
    const cell = Math.floor((5 * TiB) / ((16 * TiB) / 256));
    expect(shares[cell]).toBeGreaterThan(0);
    expect(colourOf(shares[cell]!)).not.toBe(colourOf(0));
    expect([...shares].filter((s) => s > 0)).toHaveLength(1);
  });

  it('shares add up: a fully written region is 100%, half of a cell is 50%, rows of a smaller capacity end early', () => {
    const shares = cellShares(
      [
        { offset: 0, length: 32 * MiB },
        { offset: 48 * MiB, length: 128 * 1024 },
      ],
      64 * MiB,
      256,
    );
    expect(shares.slice(0, 128).every((s) => s === 1)).toBe(true);
    expect(shares[192]).toBe(0.5);
    const svg = renderBlockmap(
      [
        { label: 'old', note: 'full backup', capacityBytes: 32 * MiB, extents: [] },
        { label: 'grown', note: 'changed', capacityBytes: 64 * MiB, extents: [{ offset: 40 * MiB, length: MiB }] },
      ],
      't',
    );
    expect(svg).toContain('end (32.0 MiB)');
  });
});
