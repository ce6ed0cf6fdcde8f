/**
 * Ctrl-C during a CSI-direct backup (no --source): the command stops, takes down the volume it created from
 * the snapshot (unpublish, unstage, delete), commits nothing, and exits 130.
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BackupRepository } from '../../src/backup/repository.js';
import { MiB, dataPlaneSuite, loopDevicesUnder, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';
import { startCli } from './support/cli.js';
import { createVolume, publish, snapshot } from './support/volumes.js';

let env: NodeEnv;
const CAPACITY = 256 * MiB;

dataPlaneSuite('backup interrupted with Ctrl-C', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  });
  afterAll(async () => {
    await env?.cleanup();
  });

  it('cleans up the temporary volume, commits nothing and exits 130', async () => {
    const source = await publish(env, await createVolume(env, CAPACITY));
    const fd = fs.openSync(source.device, 'r+');
    const chunk = Buffer.alloc(4 * MiB);
    for (let o = 0; o < CAPACITY; o += chunk.length)
      fs.writeSync(fd, chunk.fill(o / chunk.length + 1), 0, chunk.length, o);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const snap = await snapshot(env, source.volumeId);
    await source.release();
    const repo = env.path('repo');
    const run = startCli(['backup', '--repo', repo, '--snapshot', snap, '--endpoint', env.target]);
    // Wait until the command has published its copy of the snapshot (a second loop device appears).
    const deadline = Date.now() + 60_000;
    while (loopDevicesUnder(env.stateDir).length === 0 && Date.now() < deadline) await sleep(50);
    expect(loopDevicesUnder(env.stateDir).length, 'the backup published a copy of the snapshot').toBe(1);
    run.child.kill('SIGINT');
    const result = await run.done;
    expect(result.code, result.stderr).toBe(130);
    expect(result.stderr).toMatch(/interrupted/);
    expect(loopDevicesUnder(env.stateDir), 'no device left').toEqual([]);
    const volumes = await env.controller.call('listVolumes', {});
    expect(
      volumes.entries.map((e) => e.volume!.volumeId),
      'only the source volume is left',
    ).toEqual([source.volumeId]);
    if (fs.existsSync(repo) && fs.existsSync(`${repo}/cbt-backup-repository.json`)) {
      expect(await (await BackupRepository.open(repo)).backupIds()).toEqual([]);
    }
  }, 180_000);
});
