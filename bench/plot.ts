/**
 * Benchmark trends as a picture: one metric of one or more benchmark runs (JSON lines as `npm run bench`
 * prints them), drawn against one of its params, one line per run.
 *
 *   npm run bench:plot -- --metric chain_read_4k_us --x snapshots --log-x --out read.svg v2=new.jsonl old=old.jsonl
 *
 * Not a suite (bench/run.ts skips it): it reads results, it measures nothing.
 */
import * as fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import { Command } from 'commander';
import { escapeXml as esc, svgHeader } from '../src/svg.js';
import type { BenchResult } from './suite.js';

export interface TrendPoint {
  x: number;
  y: number;
}

export interface TrendSeries {
  label: string;
  points: TrendPoint[];
}

export interface TrendOptions {
  title: string;
  xLabel: string;
  yLabel: string;
  logX: boolean;
}

/** Result lines of a run; lines that are not results (the runner prints only results, but logs get pasted) are skipped. */
export function parseResults(text: string): BenchResult[] {
  const out: BenchResult[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const r = JSON.parse(line) as Partial<BenchResult>;
      if (typeof r.metric === 'string' && typeof r.value === 'number' && r.params) out.push(r as BenchResult);
    } catch {
      // a truncated last line of an interrupted run
    }
  }
  return out;
}

/** The points of `metric` in `results`, x from the numeric param `xParam`, in x order. */
export function seriesOf(label: string, results: readonly BenchResult[], metric: string, xParam: string): TrendSeries {
  const points: TrendPoint[] = [];
  for (const r of results) {
    if (r.metric !== metric) continue;
    const x = r.params[xParam];
    if (typeof x === 'number') points.push({ x, y: r.value });
  }
  if (points.length === 0) throw new Error(`${label}: no result of metric ${metric} with a numeric param ${xParam}`);
  return { label, points: points.sort((a, b) => a.x - b.x) };
}

const PALETTE = ['#1f6feb', '#d1495b', '#2a9d8f', '#e9a23b', '#6a4c93', '#444444'];
const LEFT = 80;
const TOP = 46;
const PLOT_W = 560;
const PLOT_H = 300;

/** About six round values from 0, the last one at or above max. */
export function linearTicks(max: number): number[] {
  if (max <= 0) return [0, 1];
  const rough = max / 5;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough) ?? rough;
  const out = [0];
  while (out.at(-1)! < max) out.push(Number((out.length * step).toPrecision(12)));
  return out;
}

/** Powers of ten from at or below min to at or above max. */
export function logTicks(min: number, max: number): number[] {
  const out: number[] = [];
  const last = Math.ceil(Math.log10(max) - 1e-9);
  for (let e = Math.floor(Math.log10(min) + 1e-9); e <= last; e++) out.push(10 ** e);
  if (out.length === 1) out.push(10 ** (last + 1));
  return out;
}

const shortNumber = (v: number) => (Math.abs(v) >= 1000 ? v.toLocaleString('en-US') : String(Number(v.toPrecision(3))));

/** A line chart of the series: axes with labels, one coloured line with dots per series, and a legend. */
export function renderTrend(series: readonly TrendSeries[], opts: TrendOptions): string {
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) throw new Error('nothing to draw');
  if (opts.logX && all.some((p) => p.x <= 0)) throw new Error('a log x axis needs x values above 0');
  const xs = all.map((p) => p.x);
  const [xMin, xMax] = [Math.min(...xs), Math.max(...xs)];
  const yTicks = linearTicks(Math.max(...all.map((p) => p.y)) * 1.05);
  const yMax = yTicks.at(-1)!;
  const xTicks = opts.logX ? logTicks(xMin, xMax) : linearTicks(xMax);
  const [x0, x1] = opts.logX ? [Math.log10(xTicks[0]!), Math.log10(xTicks.at(-1)!)] : [0, xTicks.at(-1) || 1];
  const px = (x: number) => LEFT + (((opts.logX ? Math.log10(x) : x) - x0) / (x1 - x0 || 1)) * PLOT_W;
  const py = (y: number) => TOP + PLOT_H - (y / yMax) * PLOT_H;

  const width = LEFT + PLOT_W + 40;
  const legendTop = TOP + PLOT_H + 60;
  const height = legendTop + 22 * series.length - 6;
  const out = svgHeader(width, height, opts.title);
  out.push(`<text x="10" y="24" font-size="15" font-weight="bold">${esc(opts.title)}</text>`);
  for (const t of yTicks) {
    const y = py(t);
    out.push(`<line x1="${LEFT}" y1="${y}" x2="${LEFT + PLOT_W}" y2="${y}" stroke="#ddd" stroke-width="0.7"/>`);
    out.push(`<text x="${LEFT - 6}" y="${y + 4}" text-anchor="end" font-size="10">${esc(shortNumber(t))}</text>`);
  }
  for (const t of xTicks) {
    const x = px(t);
    out.push(`<line x1="${x}" y1="${TOP}" x2="${x}" y2="${TOP + PLOT_H}" stroke="#eee" stroke-width="0.7"/>`);
    out.push(
      `<text x="${x}" y="${TOP + PLOT_H + 16}" text-anchor="middle" font-size="10">${esc(shortNumber(t))}</text>`,
    );
  }
  out.push(
    `<rect x="${LEFT}" y="${TOP}" width="${PLOT_W}" height="${PLOT_H}" fill="none" stroke="#888" stroke-width="0.8"/>`,
  );
  out.push(
    `<text x="${LEFT + PLOT_W / 2}" y="${TOP + PLOT_H + 34}" text-anchor="middle" fill="#555">${esc(opts.xLabel)}${opts.logX ? ' (log scale)' : ''}</text>`,
  );
  out.push(
    `<text transform="translate(18 ${TOP + PLOT_H / 2}) rotate(-90)" text-anchor="middle" fill="#555">${esc(opts.yLabel)}</text>`,
  );
  series.forEach((s, i) => {
    const colour = PALETTE[i % PALETTE.length]!;
    const coords = s.points.map((p) => `${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`);
    out.push(`<polyline fill="none" stroke="${colour}" stroke-width="2" points="${coords.join(' ')}"/>`);
    for (const p of s.points) {
      out.push(
        `<circle cx="${px(p.x).toFixed(1)}" cy="${py(p.y).toFixed(1)}" r="3.5" fill="${colour}"><title>${esc(`${s.label}: ${shortNumber(p.y)} at ${shortNumber(p.x)}`)}</title></circle>`,
      );
    }
    const ly = legendTop + 22 * i;
    out.push(`<rect x="${LEFT}" y="${ly - 10}" width="22" height="4" fill="${colour}"/>`);
    out.push(`<text x="${LEFT + 30}" y="${ly - 4}">${esc(s.label)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

function main(argv: readonly string[]): void {
  const program = new Command('bench:plot')
    .description('draw one metric of benchmark runs (JSON lines) against one of its params, as SVG')
    .requiredOption('--metric <name>', 'metric to draw, e.g. chain_read_4k_us')
    .requiredOption('--x <param>', 'numeric param for the x axis, e.g. snapshots')
    .requiredOption('--out <file>', 'SVG file to write')
    .option('--log-x', 'logarithmic x axis', false)
    .option('--title <text>', 'title (default: the metric)')
    .argument('<label=file...>', 'one run per argument: its legend label and its JSON lines file')
    .action((runs: string[], o: { metric: string; x: string; out: string; logX: boolean; title?: string }) => {
      const series = runs.map((arg) => {
        const eq = arg.indexOf('=');
        if (eq <= 0) throw new Error(`expected label=file, got ${arg}`);
        const results = parseResults(fs.readFileSync(arg.slice(eq + 1), 'utf8'));
        return { series: seriesOf(arg.slice(0, eq), results, o.metric, o.x), results };
      });
      const unit = series[0]!.results.find((r) => r.metric === o.metric)?.unit ?? '';
      const svg = renderTrend(
        series.map((s) => s.series),
        { title: o.title ?? o.metric, xLabel: o.x, yLabel: `${o.metric}${unit ? ` (${unit})` : ''}`, logX: o.logX },
      );
      fs.writeFileSync(o.out, svg);
      process.stderr.write(`wrote ${o.out}\n`);
    });
  try {
    program.parse(argv as string[], { from: 'user' });
  } catch (err) {
    process.stderr.write(`bench:plot: ${(err as Error).message}\n`);
    process.exit(2);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) main(process.argv.slice(2));
