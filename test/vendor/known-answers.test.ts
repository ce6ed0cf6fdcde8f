/**
 * Known answers without root: generate writes each pattern into a volume through the engine (the same
 * generator and answer records the CLI uses on a device), snapshots are cut through the Controller, and
 * check compares the driver's answers, read over CSI with connect's gRPC transport, with the records.
 * The file target (punch-hole trims) and the CLI commands are exercised on plain files.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { MetadataProfileName } from '../../src/csi/metadata-profiles.js';
import { appendAnswerRun, readAnswerRuns } from '../../src/vendor/answers.js';
import { checkAnswers, formatReport } from '../../src/vendor/check.js';
import { csiMetadataReader, type MetadataReader } from '../../src/vendor/csi-metadata-reader.js';
import { generate, openPathTarget, type PatternTarget } from '../../src/vendor/generate.js';
import { PATTERNS, blockHashes, patternOps } from '../../src/vendor/patterns.js';
import { REPO_ROOT, TSX_LOADER, startTestDriver, type TestDriver } from '../support/test-driver.js';
import { runCli } from '../backup/support/cli.js';

const run = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const CAPACITY = 32 * MiB;

let t: TestDriver;
let reader: MetadataReader;
beforeAll(async () => {
  t = await startTestDriver();
  reader = csiMetadataReader(`unix://${t.socket}`);
});
afterAll(async () => {
  reader?.close();
  await t?.stop();
});

const BLOCK_CAP = { accessMode: { mode: 1 }, accessType: { case: 'block' as const, value: {} } };
let names = 0;

async function volume(parameters: Record<string, string> = {}): Promise<string> {
  const res = await t.controller.call('createVolume', {
    name: `ka-vol-${++names}`,
    capacityRange: { requiredBytes: BigInt(CAPACITY) },
    volumeCapabilities: [BLOCK_CAP],
    parameters,
  });
  return res.volume!.volumeId;
}

async function snapshot(volumeId: string): Promise<string> {
  // The cut must come after the run's finish time, which has millisecond resolution.
  await new Promise((r) => setTimeout(r, 2));
  return (await t.controller.call('createSnapshot', { name: `ka-snap-${++names}`, sourceVolumeId: volumeId })).snapshot!
    .snapshotId;
}

/** The volume, written through the engine as the FUSE data plane would. */
function engineTarget(volumeId: string): PatternTarget {
  const store = t.driver.store;
  return {
    name: `engine:${volumeId}`,
    capacityBytes: store.getVolume(volumeId).capacityBytes,
    write: async (offset, data) => store.write(volumeId, offset, data),
    discard: async (offset, length) => store.trim(volumeId, offset, length),
    sync: async () => store.flush(volumeId),
    close: async () => undefined,
  };
}

function answersFile(): string {
  return path.join(t.dir, `answers-${++names}.jsonl`);
}

async function checkSnapshot(
  file: string,
  snapshotId: string,
  baseId?: string,
  profile: MetadataProfileName = 'exact',
  objectSize = 4 * MiB,
) {
  return checkAnswers({
    runs: readAnswerRuns(file),
    snapshotCreatedAtMs: await reader.snapshotCreatedAtMs(snapshotId),
    ...(baseId ? { baseCreatedAtMs: await reader.snapshotCreatedAtMs(baseId) } : {}),
    reported: (await reader.extents(snapshotId, baseId)).extents,
    granularity: profile === 'ceph-rbd' ? objectSize : profile === 'hostpath' ? 4096 : 0,
    readRestored: async (offset, length) => t.driver.store.readSnapshot(snapshotId, offset, length),
  });
}

describe('patterns', () => {
  test('the same seed gives the same operations and bytes; another seed does not', () => {
    for (const pattern of PATTERNS) {
      const spec = { pattern, seed: 7, count: 50, blockSize: 4096, capacityBytes: CAPACITY };
      const ops = (s: typeof spec) =>
        [...patternOps(s)].map(
          (op) =>
            `${op.kind} ${op.block}+${op.blocks} ${op.kind === 'write' ? blockHashes(op.data, 4096).join(',') : ''}`,
        );
      const a = ops(spec);
      expect(ops(spec)).toEqual(a);
      expect(ops({ ...spec, seed: 8 })).not.toEqual(a);
    }
  });
});

describe('generate + snapshot + check round trips (engine, over CSI)', () => {
  for (const pattern of PATTERNS) {
    test(`${pattern}: allocated(S1), delta(S1, S2) and the snapshot's bytes all match the answers`, async () => {
      const vol = await volume();
      const file = answersFile();
      // A first run gives trims something to discard and the delta a history to differ from.
      appendAnswerRun(
        file,
        await generate({ pattern: 'random', seed: 1, count: 300, blockSize: 4096 }, engineTarget(vol)),
      );
      const s1 = await snapshot(vol);
      appendAnswerRun(file, await generate({ pattern, seed: 2, count: 200, blockSize: 4096 }, engineTarget(vol)));
      const s2 = await snapshot(vol);
      const allocated1 = await checkSnapshot(file, s1);
      expect(allocated1).toMatchObject({
        ok: true,
        mode: 'allocated',
        runsUsed: [0],
        missing: [],
        extraNotAllowed: [],
        extraAllowed: [],
      });
      expect(allocated1.expectedBytes).toBeGreaterThan(0);
      const delta = await checkSnapshot(file, s2, s1);
      expect(delta).toMatchObject({
        ok: true,
        mode: 'delta',
        runsUsed: [1],
        missing: [],
        extraNotAllowed: [],
        checksumMismatches: [],
      });
      expect(delta.expectedBytes).toBeGreaterThan(0);
      expect((await checkSnapshot(file, s2)).ok).toBe(true);
    });
  }
});

describe('check finds what is wrong', () => {
  test('a change the driver does not report is missing, and check fails', async () => {
    const vol = await volume();
    const file = answersFile();
    appendAnswerRun(
      file,
      await generate({ pattern: 'sparse', seed: 3, count: 20, blockSize: 4096 }, engineTarget(vol)),
    );
    const snap = await snapshot(vol);
    const runs = readAnswerRuns(file);
    const reported = (await reader.extents(snap, undefined)).extents.slice(1); // as a driver that lost its first extent
    const report = await checkAnswers({
      runs,
      snapshotCreatedAtMs: await reader.snapshotCreatedAtMs(snap),
      reported,
      granularity: 0,
    });
    expect(report.ok).toBe(false);
    expect(report.missing).toHaveLength(1);
  });

  test('a restored block that differs is a checksum mismatch, and check fails', async () => {
    const vol = await volume();
    const file = answersFile();
    appendAnswerRun(
      file,
      await generate({ pattern: 'sequential', seed: 4, count: 10, blockSize: 4096 }, engineTarget(vol)),
    );
    const snap = await snapshot(vol);
    const run0 = readAnswerRuns(file)[0]!;
    const corrupt = run0.changed[0]![0] + 4096 * 3;
    const report = await checkAnswers({
      runs: [run0],
      snapshotCreatedAtMs: await reader.snapshotCreatedAtMs(snap),
      granularity: 0,
      readRestored: async (offset, length) => {
        const data = t.driver.store.readSnapshot(snap, offset, length);
        if (offset === corrupt) data[100] = data[100]! ^ 1;
        return data;
      },
    });
    expect(report).toMatchObject({ ok: false, checksumMismatches: [corrupt], blocksCompared: 10 });
  });

  test('ceph-rbd: whole-object extras are reported as allowed; the same extras under exact fail', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd', objectSize: '1Mi' });
    const file = answersFile();
    const base = await snapshot(vol);
    appendAnswerRun(
      file,
      await generate({ pattern: 'random', seed: 5, count: 30, blockSize: 4096 }, engineTarget(vol)),
    );
    const target = await snapshot(vol);
    const asCeph = await checkSnapshot(file, target, base, 'ceph-rbd', MiB);
    expect(asCeph).toMatchObject({ ok: true, missing: [], extraNotAllowed: [] });
    expect(asCeph.extraAllowed.length).toBeGreaterThan(0);
    const asExact = await checkSnapshot(file, target, base, 'exact');
    expect(asExact.ok).toBe(false);
    expect(asExact.extraNotAllowed.length).toBeGreaterThan(0);
  });

  test('a run still going when the snapshot was cut is a problem, not a silent pass', async () => {
    const vol = await volume();
    const file = answersFile();
    appendAnswerRun(file, await generate({ pattern: 'random', seed: 6, count: 5, blockSize: 4096 }, engineTarget(vol)));
    const snap = await snapshot(vol);
    const [r] = readAnswerRuns(file);
    const created = await reader.snapshotCreatedAtMs(snap);
    const report = await checkAnswers({
      runs: [{ ...r!, finishedAtMs: created + 1000 }],
      snapshotCreatedAtMs: created,
      granularity: 0,
    });
    expect(report.ok).toBe(false);
    expect(report.problems[0]).toMatch(/still running when the snapshot was cut/);
  });
});

describe('file target and the CLI', () => {
  test('generate on a regular file: writes, punch-hole trims read as zeros, and check --restored of that file holds', async () => {
    const target = path.join(t.dir, `target-${++names}.img`);
    fs.writeFileSync(target, Buffer.alloc(0));
    fs.truncateSync(target, 8 * MiB);
    const file = answersFile();
    const cli = (args: string[]) =>
      run(process.execPath, ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), ...args]);
    await cli([
      'generate',
      '--target',
      target,
      '--seed',
      '9',
      '--pattern',
      'random',
      '--count',
      '200',
      '--answers',
      file,
    ]);
    const trim = await cli([
      'generate',
      '--target',
      target,
      '--seed',
      '10',
      '--pattern',
      'trim',
      '--count',
      '40',
      '--answers',
      file,
    ]);
    expect(trim.stdout).toMatch(/trimmed/);
    const runs = readAnswerRuns(file);
    expect(runs).toHaveLength(2);
    expect(runs[1]!.trimmed.length).toBeGreaterThan(0);
    // Every trimmed block reads as zeros from the file itself.
    const [offset, length] = runs[1]!.trimmed[0]!;
    const fd = fs.openSync(target, 'r');
    const buf = Buffer.alloc(length, 1);
    fs.readSync(fd, buf, 0, length, offset);
    fs.closeSync(fd);
    expect(buf.equals(Buffer.alloc(length))).toBe(true);
    // check with restored data only (no driver): the file is its own restore.
    const later = String(Date.now() + 1000);
    const ok = await cli([
      'check',
      '--answers',
      file,
      '--snapshot',
      'none',
      '--restored',
      target,
      '--no-metadata',
      '--created-at',
      later,
    ]);
    expect(ok.stdout).toMatch(/OK/);
    // One flipped byte in a recorded block: exit code 1 and the mismatch named.
    const changed = runs[0]!.changed.find(([o]) => !runs[1]!.trimmed.some(([to, tl]) => o >= to && o < to + tl))!;
    const fdw = fs.openSync(target, 'r+');
    fs.writeSync(fdw, Buffer.from([0x5a]), 0, 1, changed[0]);
    fs.closeSync(fdw);
    const bad = await cli([
      'check',
      '--answers',
      file,
      '--snapshot',
      'none',
      '--restored',
      target,
      '--no-metadata',
      '--created-at',
      later,
    ]).catch((e: { code: number; stdout: string }) => e);
    expect((bad as { code: number }).code).toBe(1);
    expect((bad as { stdout: string }).stdout).toMatch(/1 checksum mismatches/);
    expect((bad as { stdout: string }).stdout).toContain(
      `checksum mismatch: block ${changed[0] / 4096} (bytes [${changed[0]}, +4096)) differs from the answers`,
    );
  });

  test('every pattern on a plain file: generate (punch-hole trims), then the file checks against its answers; a changed byte names its block', async () => {
    for (const pattern of PATTERNS) {
      const target = path.join(t.dir, `plain-${pattern}-${++names}.img`);
      fs.writeFileSync(target, Buffer.alloc(0));
      fs.truncateSync(target, 8 * MiB);
      const file = answersFile();
      for (const [seed, p] of [
        [1, 'random'],
        [2, pattern],
      ] as const) {
        const handle = await openPathTarget(target);
        try {
          appendAnswerRun(file, await generate({ pattern: p, seed, count: 120, blockSize: 4096 }, handle));
        } finally {
          await handle.close();
        }
      }
      const runs = readAnswerRuns(file);
      const read = async (offset: number, length: number) => {
        const buf = Buffer.alloc(length);
        const fd = fs.openSync(target, 'r');
        fs.readSync(fd, buf, 0, length, offset);
        fs.closeSync(fd);
        return buf;
      };
      const later = Date.now() + 1000;
      const ok = await checkAnswers({ runs, snapshotCreatedAtMs: later, granularity: 0, readRestored: read });
      expect(ok, pattern).toMatchObject({ ok: true, runsUsed: [0, 1], checksumMismatches: [] });
      if (pattern === 'trim') expect(runs[1]!.trimmed.length).toBeGreaterThan(0);
      const wrong = runs[1]!.changed.at(-1)![0];
      const fd = fs.openSync(target, 'r+');
      fs.writeSync(fd, Buffer.from([0xa5]), 0, 1, wrong + 7);
      fs.closeSync(fd);
      const bad = await checkAnswers({ runs, snapshotCreatedAtMs: later, granularity: 0, readRestored: read });
      expect(bad, pattern).toMatchObject({ ok: false, checksumMismatches: [wrong] });
      expect(formatReport(bad)).toContain(`checksum mismatch: block ${wrong / 4096} (bytes [${wrong}, +4096))`);
    }
  });

  test('cbt-csi check against the running driver exits 0 when the answers hold', async () => {
    const vol = await volume();
    const file = answersFile();
    appendAnswerRun(
      file,
      await generate({ pattern: 'hotspot', seed: 11, count: 100, blockSize: 4096 }, engineTarget(vol)),
    );
    const snap = await snapshot(vol);
    const res = await run(process.execPath, [
      '--import',
      TSX_LOADER,
      path.join(REPO_ROOT, 'src/cli.ts'),
      'check',
      '--answers',
      file,
      '--snapshot',
      snap,
      '--endpoint',
      `unix://${t.socket}`,
    ]);
    expect(res.stdout).toMatch(/missing: none/);
    expect(res.stdout).toMatch(/OK\n$/);
  });

  test('cbt-csi check: --namespace with --endpoint, or --kubeconfig without --namespace, exits 2 with one line saying why', async () => {
    const file = answersFile();
    appendAnswerRun(
      file,
      await generate({ pattern: 'sparse', seed: 3, count: 4, blockSize: 4096 }, engineTarget(await volume())),
    );
    const common = ['check', '--answers', file, '--snapshot', 'snap-1'];
    const both = await runCli([...common, '--namespace', 'apps', '--endpoint', `unix://${t.socket}`]);
    expect([both.code, both.stdout, both.stderr]).toEqual([
      2,
      '',
      'cbt-csi check: --endpoint (CSI direct) and --namespace (Kubernetes, through the sidecar) exclude each other\n',
    ]);
    const stray = await runCli([
      ...common,
      '--kubeconfig',
      '/nonexistent/kubeconfig',
      '--endpoint',
      `unix://${t.socket}`,
    ]);
    expect([stray.code, stray.stderr]).toEqual([
      2,
      'cbt-csi check: --kubeconfig is for Kubernetes mode: give --namespace too\n',
    ]);
  });
});
