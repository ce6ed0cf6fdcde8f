/**
 * `cbt-csi demo`, as docs/quickstart-local.md gives it, against a running driver: it shows the delta beside
 * what it wrote, draws the block map, backs up and restores byte for byte, and leaves no volume or snapshot.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { dataPlaneSuite, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';
import { REPO_ROOT } from '../support/test-driver.js';
import { runCli } from './support/cli.js';

let env: NodeEnv;

dataPlaneSuite('cbt-csi demo', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  });
  afterAll(async () => {
    await env?.cleanup();
  });

  it("runs the quickstart's demo line: delta beside the writes, block map, identical restore, all cleaned up", async () => {
    const doc = fs.readFileSync(`${REPO_ROOT}/docs/quickstart-local.md`, 'utf8');
    const line = doc.split('\n').find((l) => l.includes('src/cli.ts demo'))!;
    expect(line).toBeDefined();
    const args = line
      .slice(line.indexOf('demo'))
      .split(/\s+/)
      .map((a) => a.replace('unix:///tmp/cbt/csi.sock', env.target));
    const out = env.path('map.svg');
    const r = await runCli([...args, '--out', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/VARIABLE_LENGTH: 4 changed extents/);
    expect(r.stdout).toMatch(/52429312 \+1024 +52428800 \+4096/);
    expect(r.stdout).toContain('identical to the volume, byte for byte');
    expect(fs.readFileSync(out, 'utf8')).toMatch(/^<svg/);
    expect((await env.controller.call('listVolumes', {})).entries).toEqual([]);
    expect((await env.controller.call('listSnapshots', {})).entries).toEqual([]);
  }, 180_000);
});
