/**
 * A backup killed at any point (SIGKILL: no cleanup runs) leaves the repository valid and the partial
 * backup absent: `cbt-csi verify` passes, every backup listed restores, and the next backup succeeds.
 * Kill points are random over the command's whole run, measured first (≥ 20 under CI=true). The
 * snapshot's bytes are read from an image file (--source), so the kills leave no devices behind.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BackupRepository } from '../../src/backup/repository.js';
import { mulberry32 } from '../support/random.js';
import { MiB, dataPlaneSuite, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';
import { jsonOf, runCli, startCli } from './support/cli.js';
import { createVolume, publish, snapshot, snapshotBytes } from './support/volumes.js';

const CAPACITY = 48 * MiB;
const KILLS = process.env.CI === 'true' ? 20 : 6;
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

let env: NodeEnv;

dataPlaneSuite('backup killed at random points', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  });
  afterAll(async () => {
    await env?.cleanup();
  });

  it(`after SIGKILL at ${KILLS} random points the repository verifies, and the next backup succeeds (seed ${seed})`, async () => {
    const random = mulberry32(seed);
    const repo = env.path('repo');
    const source = await publish(env, await createVolume(env, CAPACITY));
    const write = (from: number, length: number) => {
      const fd = fs.openSync(source.device, 'r+');
      fs.writeSync(fd, randomBytes(length), 0, length, from);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    };
    write(0, CAPACITY);
    const snap1 = await snapshot(env, source.volumeId);
    for (let i = 0; i < 200; i++) write(Math.floor(random() * (CAPACITY / 4096)) * 4096, 4096);
    const snap2 = await snapshot(env, source.volumeId);
    await source.release();
    const images = [env.path('snap1.img'), env.path('snap2.img')];
    fs.writeFileSync(images[0]!, await snapshotBytes(env, snap1, CAPACITY));
    fs.writeFileSync(images[1]!, await snapshotBytes(env, snap2, CAPACITY));

    const backupArgs = (snap: string, image: string, base?: string) => [
      'backup',
      '--repo',
      repo,
      '--snapshot',
      snap,
      '--source',
      image,
      ...(base ? ['--base', base] : []),
      '--endpoint',
      env.target,
      '--json',
      '--quiet',
    ];
    /** An uncut backup, and how long it took. */
    const uncut = async (args: string[]) => {
      const t0 = Date.now();
      const result = await runCli(args);
      expect(result.code, result.stderr).toBe(0);
      return { result, ms: Date.now() - t0 };
    };
    // An uncut full backup: the base of the incrementals.
    const baseId = jsonOf<{ id: string }>((await uncut(backupArgs(snap1, images[0]!))).result).id;
    // The kills alternate an incremental and a full backup. Each kind's kill points are bounded by an uncut run
    // of that kind, timed now that the command's code is loaded and cached (the very first run of a fresh
    // checkout also compiles it, and would stretch the window past most runs' end).
    const kinds = [backupArgs(snap2, images[1]!, baseId), backupArgs(snap1, images[0]!)];
    const durations = [(await uncut(kinds[0]!)).ms, (await uncut(kinds[1]!)).ms];

    let killedMidway = 0;
    for (let i = 0; i < KILLS; i++) {
      const before = await (await BackupRepository.open(repo)).backupIds();
      // Killed anywhere from start-up to the end.
      const started = Date.now();
      const run = startCli(kinds[i % 2]!);
      const ended = run.done.then(() => Date.now() - started);
      await sleep(Math.floor(random() * durations[i % 2]!));
      run.child.kill('SIGKILL');
      const result = await run.done;
      if (result.signal === 'SIGKILL') killedMidway++;
      // A run that finished before its kill point was faster than the window: that kind's later kill points
      // are drawn within this run's time (the machine's load varies while the tests run).
      else durations[i % 2] = Math.min(durations[i % 2]!, await ended);

      const repository = await BackupRepository.open(repo);
      const after = await repository.backupIds();
      // The killed backup is either absent or whole; nothing else changed.
      expect(after.slice(0, before.length)).toEqual(before);
      expect(after.length - before.length).toBeLessThanOrEqual(1);
      const verify = await runCli(['verify', '--repo', repo, '--json', '--quiet']);
      expect(verify.code, `verify after kill ${i}: ${verify.stdout} ${verify.stderr}`).toBe(0);
      expect(jsonOf<{ ok: boolean }>(verify).ok).toBe(true);
    }
    expect(killedMidway, 'most kills land while the backup runs').toBeGreaterThan(KILLS / 2);

    // The next backup succeeds, on the base, and restores to the snapshot.
    const next = await runCli(backupArgs(snap2, images[1]!, baseId));
    expect(next.code, next.stderr).toBe(0);
    const target = env.path('restored.img');
    const restore = await runCli([
      'restore',
      '--repo',
      repo,
      '--backup',
      jsonOf<{ id: string }>(next).id,
      '--target',
      target,
      '--quiet',
    ]);
    expect(restore.code, restore.stderr).toBe(0);
    expect(fs.readFileSync(target).equals(fs.readFileSync(images[1]!))).toBe(true);
    // What killed backups left (temp files, unnamed chunks) is gone once a backup has run.
    expect(fs.readdirSync(`${repo}/tmp`)).toEqual([]);
    // The writer lock is free again (its file stays; a kernel lock on it is what a writer holds).
    const repository = await BackupRepository.open(repo);
    await (await repository.lock()).release();
    const referenced = await repository.referencedChunks();
    const stored = fs.readdirSync(`${repo}/chunks`).flatMap((d) => fs.readdirSync(`${repo}/chunks/${d}`));
    expect(
      stored.filter((c) => !referenced.has(c)),
      'no chunk that no backup names',
    ).toEqual([]);
  }, 900_000);
});
