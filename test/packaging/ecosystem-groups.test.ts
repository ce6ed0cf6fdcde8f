/**
 * The build groups of scripts/ecosystem/versions.json (scripts/ecosystem/group.mjs): components built in
 * one module so what they share compiles once. A group may raise a member's dependency (Go's minimal
 * version selection), never lower it below its own go.mod, and two members may not replace one module
 * differently.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { REPO_ROOT } from '../support/test-driver.js';

const GROUP = path.join(REPO_ROOT, 'scripts/ecosystem/group.mjs');
const components = (
  JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'scripts/ecosystem/versions.json'), 'utf8')) as {
    components: Record<string, { version: string; buildWith?: string; source?: string; buildable?: boolean }>;
  }
).components;

function group(args: string[], stdin = '', env: Record<string, string> = {}) {
  return spawnSync(process.execPath, [GROUP, ...args], {
    input: stdin,
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
}

describe('build groups', () => {
  test('every component is built by exactly one group, whose host builds alone and is not a program of ours', () => {
    const r = group(['hosts', ...Object.keys(components)]);
    expect(r.stderr).toBe('');
    const hosts = r.stdout.trim().split('\n');
    for (const host of hosts) expect(components[host]?.buildWith, host).toBeUndefined();
    for (const [name, c] of Object.entries(components)) {
      if (!c.buildWith) continue;
      expect(hosts, name).toContain(c.buildWith);
      expect(c.source, `${name} is ours and builds from its own go.mod`).toBeUndefined();
      expect(components[c.buildWith]?.source, `${name} built with a program of ours`).toBeUndefined();
      const members = group(['members', c.buildWith]).stdout.trim().split('\n');
      expect(members[0]).toBe(c.buildWith);
      expect(members).toContain(name);
    }
  });

  test('a group records every member entry, so changing any member rebuilds the whole group', () => {
    const host = Object.values(components).find((c) => c.buildWith)?.buildWith;
    expect(host).toBeDefined();
    const spec = JSON.parse(group(['spec', host!]).stdout) as Record<string, unknown>;
    const expected = Object.entries(components)
      .filter(([n, c]) => (n === host || c.buildWith === host) && c.buildable !== false)
      .map(([n]) => n);
    expect(Object.keys(spec).sort()).toEqual(expected.sort());
  });
});

const hasGo = spawnSync('go', ['version']).status === 0;
describe.skipIf(!hasGo && process.env.CI !== 'true')('group version checks (need go)', () => {
  let dir: string;
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function gomods(files: Record<string, string>): string {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-groups-'));
    return Object.entries(files)
      .map(([name, text]) => {
        const file = path.join(dir, `${name}.mod`);
        fs.writeFileSync(file, text);
        return `${name} ${file}\n`;
      })
      .join('');
  }

  test('a raised dependency is listed against the member whose go.mod asked for less', () => {
    const stdin = gomods({
      helm: 'module helm.sh/helm/v3\n\ngo 1.26\n\nrequire k8s.io/client-go v0.37.0\n',
      'external-resizer': 'module example.com/resizer\n\ngo 1.26\n\nrequire k8s.io/client-go v0.37.1\n',
    });
    const r = group(['changes', 'helm'], stdin, { GROUP_LIST: 'k8s.io/client-go v0.37.1\n' });
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe('helm: k8s.io/client-go v0.37.0 -> v0.37.1');
  });

  test('a member replacing a module below what another member requires fails the group (exit 3)', () => {
    const stdin = gomods({
      helm: 'module helm.sh/helm/v3\n\ngo 1.26\n\nrequire k8s.io/api v0.37.0\n',
      'external-resizer':
        'module example.com/resizer\n\ngo 1.26\n\nrequire k8s.io/api v0.36.1\n\nreplace k8s.io/api => k8s.io/api v0.36.1\n',
    });
    const r = group(['changes', 'helm'], stdin, { GROUP_LIST: 'k8s.io/api v0.37.0\n' });
    expect(r.status).toBe(3);
    expect(r.stdout).toContain('helm: k8s.io/api v0.37.0 -> v0.36.1 (LOWER than its go.mod)');
  });

  test('two members replacing one module with different versions is refused', () => {
    const stdin = gomods({
      helm: 'module helm.sh/helm/v3\n\ngo 1.26\n\nrequire k8s.io/api v0.36.1\n\nreplace k8s.io/api => k8s.io/api v0.36.1\n',
      'external-resizer':
        'module example.com/resizer\n\ngo 1.26\n\nrequire k8s.io/api v0.36.1\n\nreplace k8s.io/api => k8s.io/api v0.36.2\n',
    });
    const r = group(['replaces', 'helm'], stdin);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('pin them alike');
  });

  test('local replaces of required modules are pinned to the member version (localVersion when it has one)', () => {
    const stdin = gomods({
      helm: 'module helm.sh/helm/v3\n\ngo 1.26\n\nrequire example.com/lib v1.0.0\n\nreplace example.com/lib => ./lib\n\nreplace example.com/unused => ./unused\n',
    });
    const r = group(['replaces', 'helm'], stdin);
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(`-replace=example.com/lib=example.com/lib@${components.helm!.version}`);
  });
});
