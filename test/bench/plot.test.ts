/**
 * bench:plot draws a metric of benchmark runs against one of its params: the points it draws are exactly
 * the runs' results, in x order, on axes that contain them.
 */
import { describe, expect, it } from 'vitest';
import { linearTicks, logTicks, parseResults, renderTrend, seriesOf } from '../../bench/plot.js';

const run = [
  '{"suite":"engine","metric":"chain_read_4k_us","value":6.3,"unit":"µs","params":{"snapshots":1000}}',
  '[engine] a log line that got pasted in',
  '{"suite":"engine","metric":"chain_read_4k_us","value":2.5,"unit":"µs","params":{"snapshots":1}}',
  '{"suite":"engine","metric":"chain_snapshot_p99_ms","value":2.3,"unit":"ms","params":{"snapshots":1000}}',
  '{"suite":"engine","metric":"chain_read_4k_us","value":3.7,"unit":"µs","params":{"snapshots":100}}',
  '{"suite":"engine","metric":"chain_read_4k_us","val',
].join('\n');

describe('bench:plot', () => {
  it('takes the metric’s results from JSON lines, skipping other lines, in x order', () => {
    const s = seriesOf('v2', parseResults(run), 'chain_read_4k_us', 'snapshots');
    expect(s.points).toEqual([
      { x: 1, y: 2.5 },
      { x: 100, y: 3.7 },
      { x: 1000, y: 6.3 },
    ]);
  });

  it('refuses a metric or param the run does not have, naming it', () => {
    expect(() => seriesOf('v2', parseResults(run), 'no_such_metric', 'snapshots')).toThrow(/no_such_metric/);
    expect(() => seriesOf('v2', parseResults(run), 'chain_read_4k_us', 'capacity')).toThrow(/capacity/);
  });

  it('axes reach past the largest value, on both scales', () => {
    expect(linearTicks(367).at(-1)).toBeGreaterThanOrEqual(367);
    expect(linearTicks(367)[0]).toBe(0);
    expect(logTicks(1, 1000)).toEqual([1, 10, 100, 1000]);
    expect(logTicks(3, 700)).toEqual([1, 10, 100, 1000]);
  });

  it('draws one line per run with a dot per result, a title and a legend', () => {
    const a = seriesOf('engine v2', parseResults(run), 'chain_read_4k_us', 'snapshots');
    const b = {
      label: 'engine before',
      points: [
        { x: 1, y: 7.6 },
        { x: 1000, y: 350 },
      ],
    };
    const svg = renderTrend([a, b], { title: 'Reads <chain>', xLabel: 'snapshots', yLabel: 'µs', logX: true });
    expect(svg).toContain('role="img"');
    expect(svg).toContain('<title>Reads &lt;chain&gt;</title>');
    expect(svg.match(/<polyline /g)).toHaveLength(2);
    expect(svg.match(/<circle /g)).toHaveLength(5);
    expect(svg).toContain('engine v2');
    expect(svg).toContain('engine before');
    // Every dot inside the plot area (x 80..640, y 46..346).
    for (const m of svg.matchAll(/cx="([\d.]+)" cy="([\d.]+)"/g)) {
      expect(Number(m[1])).toBeGreaterThanOrEqual(80);
      expect(Number(m[1])).toBeLessThanOrEqual(640);
      expect(Number(m[2])).toBeGreaterThanOrEqual(46);
      expect(Number(m[2])).toBeLessThanOrEqual(346);
    }
  });

  it('refuses a log axis over a zero', () => {
    expect(() =>
      renderTrend([{ label: 'x', points: [{ x: 0, y: 1 }] }], { title: 't', xLabel: 'x', yLabel: 'y', logX: true }),
    ).toThrow(/log/);
  });
});
