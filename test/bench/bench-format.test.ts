import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runBench(args: readonly string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('npx', ['tsx', 'bench/run.ts', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Every case of the engine suite must report at least these metrics. */
const ENGINE_METRICS = [
  'delta_all_extents_ms',
  'allocated_all_extents_ms',
  'delta_capacity_ratio',
  'delta_iterator_extents_per_s',
  'create_snapshot_p50_ms',
  'create_snapshot_p99_ms',
  'seq_write_engine_MBps',
  'seq_write_fs_MBps',
  'seq_write_engine_vs_fs',
  'random_write_4k_iops',
  'memory_rss_mb',
];

describe('npm run bench', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-format-'));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('prints only JSON result lines with suite, metric, value, unit and params, and cleans up its directory', async () => {
    const res = await runBench(['engine', '--quick', '--dir', dir]);
    expect(res.code, res.stderr).toBe(0);
    const lines = res.stdout.split('\n');
    expect(lines.pop()).toBe(''); // newline-terminated, no partial last line
    expect(lines.length).toBeGreaterThan(0);
    const metrics = new Set<string>();
    for (const line of lines) {
      let parsed: unknown;
      expect(() => (parsed = JSON.parse(line)), `not JSON: ${line}`).not.toThrow();
      const r = parsed as Record<string, unknown>;
      expect(r.suite).toBe('engine');
      expect(typeof r.metric === 'string' && r.metric !== '', line).toBe(true);
      expect(typeof r.value === 'number' && Number.isFinite(r.value), line).toBe(true);
      expect(typeof r.unit === 'string' && r.unit !== '', line).toBe(true);
      expect(typeof r.params === 'object' && r.params !== null && !Array.isArray(r.params), line).toBe(true);
      for (const v of Object.values(r.params as object)) {
        expect(['string', 'number', 'boolean'], line).toContain(typeof v);
      }
      // target and pass come together or not at all
      expect('target' in r, line).toBe('pass' in r);
      if ('target' in r) {
        expect(typeof r.target, line).toBe('string');
        expect(typeof r.pass, line).toBe('boolean');
      }
      metrics.add(r.metric as string);
    }
    for (const m of ENGINE_METRICS) expect(metrics, `missing metric ${m}`).toContain(m);
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it('runs only the cases named by --only', async () => {
    const res = await runBench(['engine', '--quick', '--dir', dir, '--only', 'snapshot-latency']);
    expect(res.code, res.stderr).toBe(0);
    const metrics = res.stdout
      .trim()
      .split('\n')
      .map((l) => (JSON.parse(l) as { metric: string }).metric);
    expect(new Set(metrics)).toEqual(new Set(['create_snapshot_p50_ms', 'create_snapshot_p99_ms']));
  });

  it('exits 2 with a message and no output for an unknown suite', async () => {
    const res = await runBench(['no-such-suite', '--dir', dir]);
    expect(res.code).toBe(2);
    expect(res.stdout).toBe('');
    expect(res.stderr).toMatch(/unknown suite "no-such-suite"/);
    expect(res.stderr).toMatch(/available: .*engine/);
  });

  it('treats path-like and infrastructure names as unknown suites', async () => {
    for (const name of ['../package', 'run', 'suite']) {
      const res = await runBench([name]);
      expect(res.code, name).toBe(2);
      expect(res.stderr, name).toMatch(/unknown suite/);
    }
  });

  it('exits 2 for an unknown option or no suite at all', async () => {
    expect((await runBench(['engine', '--bogus'])).code).toBe(2);
    expect((await runBench([])).code).toBe(2);
  });
});
