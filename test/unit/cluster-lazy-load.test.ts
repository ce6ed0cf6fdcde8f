/**
 * Single mode must not pay for multi-node at start-up: loading @kubernetes/client-node and @grpc/grpc-js
 * took 13 s and 4 s on this project's busy 2-core machine, enough to push `cbt-csi serve` past the start-up
 * time its tests allow. They are loaded only when peers are configured (src/cluster/cluster.ts).
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { expect, it } from 'vitest';
import { REPO_ROOT, TSX_LOADER } from '../support/test-driver.js';

it('importing the driver (server, CLI flags) loads neither the gRPC client nor the Kubernetes client', () => {
  const probe = `
    import { createRequire } from 'node:module';
    await import(${JSON.stringify(path.join(REPO_ROOT, 'src/server.ts'))});
    await import(${JSON.stringify(path.join(REPO_ROOT, 'src/cluster/peer-directory.ts'))});
    const loaded = Object.keys(createRequire(import.meta.url).cache);
    console.log(JSON.stringify(['@grpc/grpc-js', '@kubernetes/client-node'].filter((m) => loaded.some((f) => f.includes(m)))));
  `;
  const r = spawnSync(process.execPath, ['--import', TSX_LOADER, '--input-type=module', '-e', probe], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
    timeout: 110_000,
  });
  expect(r.status, r.stderr).toBe(0);
  expect(JSON.parse(r.stdout.trim().split('\n').pop()!)).toEqual([]);
});
