/**
 * The block map: an SVG picture of where allocated or changed data sits on a volume. One row per snapshot
 * or backup, the volume's capacity across, each cell coloured by the share of its bytes that the row's
 * extents cover. Shares are binned on a log scale, so a single changed 4 KiB block in a 64 GiB cell of a
 * 16 TiB volume is as visible as a fully rewritten cell of a 64 MiB one.
 */
import type { Extent } from '../client/index.js';
import { escapeXml, svgHeader } from '../svg.js';
import { axisBytes, formatBytes } from './units.js';

export interface BlockmapRow {
  label: string;
  /** What the row shows, e.g. "allocated" or "changed since …". */
  note: string;
  capacityBytes: number;
  extents: readonly Extent[];
}

const COLUMNS = 256;
const CELL_W = 3;
const ROW_H = 22;
const LEFT = 230;
const TOP = 40;

/** Share bins, upper bounds inclusive, and their colours (light to dark). */
const BINS: { upTo: number; label: string; colour: string }[] = [
  { upTo: 0, label: 'no change', colour: '#eef1f4' },
  { upTo: 0.01, label: '≤ 1%', colour: '#fde68a' },
  { upTo: 0.1, label: '≤ 10%', colour: '#fbbf24' },
  { upTo: 0.5, label: '≤ 50%', colour: '#f97316' },
  { upTo: 1, label: '> 50%', colour: '#b91c1c' },
];

export function colourOf(share: number): string {
  for (const b of BINS) if (share <= b.upTo) return b.colour;
  return BINS.at(-1)!.colour;
}

/** The share of each of `columns` equal cells of [0, capacity) that `extents` cover. */
export function cellShares(extents: readonly Extent[], capacity: number, columns = COLUMNS): Float64Array {
  const covered = new Float64Array(columns);
  const cell = capacity / columns;
  for (const e of extents) {
    const end = Math.min(e.offset + e.length, capacity);
    let at = e.offset;
    while (at < end) {
      const i = Math.min(columns - 1, Math.floor(at / cell));
      const cellEnd = Math.min(end, (i + 1) * cell);
      covered[i]! += cellEnd - at;
      at = cellEnd > at ? cellEnd : end;
    }
  }
  for (let i = 0; i < columns; i++) covered[i] = Math.min(1, covered[i]! / cell);
  return covered;
}

/** Tick positions: a power of two (or ×4) step giving 4 to 8 ticks across. */
function ticks(capacity: number): number[] {
  let step = 2 ** Math.floor(Math.log2(capacity / 4));
  while (capacity / step > 8) step *= 2;
  const out: number[] = [];
  for (let t = 0; t <= capacity; t += step) out.push(t);
  if (out.at(-1) !== capacity) out.push(capacity);
  return out;
}

const esc = escapeXml;

export function renderBlockmap(rows: readonly BlockmapRow[], title: string): string {
  const capacity = Math.max(1, ...rows.map((r) => r.capacityBytes));
  const width = LEFT + COLUMNS * CELL_W + 30;
  const gridBottom = TOP + rows.length * ROW_H;
  const height = gridBottom + 90;
  const out: string[] = [];
  out.push(...svgHeader(width, height, title));
  out.push(`<text x="10" y="22" font-size="15" font-weight="bold">${esc(title)}</text>`);
  out.push(
    `<text x="${width - 10}" y="22" text-anchor="end" fill="#555">capacity ${esc(formatBytes(capacity))}, one cell = ${esc(formatBytes(capacity / COLUMNS))}</text>`,
  );
  rows.forEach((row, r) => {
    const y = TOP + r * ROW_H;
    const shares = cellShares(
      row.extents,
      row.capacityBytes,
      Math.max(1, Math.round((COLUMNS * row.capacityBytes) / capacity)),
    );
    const bytes = row.extents.reduce((s, e) => s + e.length, 0);
    out.push(`<text x="${LEFT - 8}" y="${y + 11}" text-anchor="end">${esc(row.label)}</text>`);
    out.push(
      `<text x="${LEFT - 8}" y="${y + 21}" text-anchor="end" font-size="9" fill="#666">${esc(row.note)}: ${esc(formatBytes(bytes))}</text>`,
    );
    // Runs of equal colour become one rect: small files for mostly unchanged volumes.
    let start = 0;
    for (let i = 1; i <= shares.length; i++) {
      if (i < shares.length && colourOf(shares[i]!) === colourOf(shares[start]!)) continue;
      out.push(
        `<rect x="${LEFT + start * CELL_W}" y="${y + 2}" width="${(i - start) * CELL_W}" height="${ROW_H - 4}" fill="${colourOf(shares[start]!)}"/>`,
      );
      start = i;
    }
    if (row.capacityBytes < capacity) {
      const x = LEFT + shares.length * CELL_W;
      out.push(
        `<text x="${x + 4}" y="${y + 15}" font-size="9" fill="#666">end (${esc(formatBytes(row.capacityBytes))})</text>`,
      );
    }
  });
  for (const t of ticks(capacity)) {
    const x = LEFT + (t / capacity) * COLUMNS * CELL_W;
    out.push(`<line x1="${x}" y1="${TOP - 2}" x2="${x}" y2="${gridBottom + 4}" stroke="#999" stroke-width="0.5"/>`);
    out.push(`<text x="${x}" y="${gridBottom + 17}" text-anchor="middle" font-size="10">${esc(axisBytes(t))}</text>`);
  }
  out.push(
    `<text x="${LEFT + (COLUMNS * CELL_W) / 2}" y="${gridBottom + 32}" text-anchor="middle" fill="#555">byte offset in the volume</text>`,
  );
  const ly = gridBottom + 50;
  out.push(`<text x="10" y="${ly + 12}">share of a cell's bytes:</text>`);
  BINS.forEach((b, i) => {
    const x = 160 + i * 100;
    out.push(`<rect x="${x}" y="${ly}" width="16" height="16" fill="${b.colour}" stroke="#999" stroke-width="0.5"/>`);
    out.push(`<text x="${x + 22}" y="${ly + 12}">${esc(b.label)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
