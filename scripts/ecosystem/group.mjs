#!/usr/bin/env node
// Build groups of scripts/ecosystem/versions.json, for build.sh. A component with `buildWith: HOST` is
// built in HOST's throwaway module, so the packages they share compile once; the group is the host and
// every component built with it.
//
//   group.mjs hosts NAME...            the groups (their hosts) that build these components, in order
//   group.mjs members HOST             the group's components, host first
//   group.mjs spec HOST                what a finished build of the group records (the members' entries)
//   group.mjs replaces HOST            (stdin: "NAME GOMOD_FILE" lines) the replace edits of the group
//   group.mjs changes HOST             (stdin as above; $GROUP_LIST: "PATH VERSION" lines of `go list -m all`)
//                                      every module a member gets at another version than its own go.mod
//                                      says; exit 3 when one is lower (a group never lowers a pin)
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const versionsFile = join(dirname(fileURLToPath(import.meta.url)), 'versions.json');
const components = JSON.parse(readFileSync(versionsFile, 'utf8')).components;
const [command, ...args] = process.argv.slice(2);

function fail(message, code = 2) {
  console.error(`group.mjs: ${message}`);
  process.exit(code);
}

function component(name) {
  const c = components[name];
  if (!c) fail(`unknown component ${name}`);
  return c;
}

function hostOf(name) {
  const c = component(name);
  if (!c.buildWith) return name;
  const host = component(c.buildWith);
  if (host.buildWith) fail(`${name} is built with ${c.buildWith}, which is itself built with ${host.buildWith}`);
  if (c.source || host.source) fail(`${name}: a program of this repository builds from its own go.mod, alone`);
  return c.buildWith;
}

function members(host) {
  const names = Object.keys(components).filter((n) => n === host || components[n].buildWith === host);
  return [host, ...names.filter((n) => n !== host && components[n].buildable !== false)];
}

/** The replace lines of a member's go.mod as build.sh applies them: "OLD PATH@VERSION" by OLD. */
function replacesOf(name, gomod) {
  const c = component(name);
  const m = JSON.parse(execFileSync('go', ['mod', 'edit', '-json', gomod], { encoding: 'utf8' }));
  const required = new Set((m.Require ?? []).map((r) => r.Path));
  const out = new Map();
  for (const r of m.Replace ?? []) {
    // Versioned replaces as they are; local ones (a directory of the same repository) pinned to the
    // release, for modules upstream requires.
    if (r.New.Version) out.set(r.Old.Path, `${r.New.Path}@${r.New.Version}`);
    else if (required.has(r.Old.Path)) out.set(r.Old.Path, `${r.Old.Path}@${c.localVersion ?? c.version}`);
  }
  return { requires: m.Require ?? [], replaces: out };
}

function stdinMembers() {
  return readFileSync(0, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const [name, gomod] = line.split(' ');
      return { name, ...replacesOf(name, gomod) };
    });
}

/** The union of the members' replaces; two members replacing one module differently is an error. */
function groupReplaces(host, list) {
  const union = new Map();
  for (const { name, replaces } of list) {
    for (const [old, to] of replaces) {
      const seen = union.get(old);
      if (seen && seen.to !== to)
        fail(`group ${host}: ${seen.name} replaces ${old} with ${seen.to}, ${name} with ${to}; pin them alike`);
      union.set(old, { to, name });
    }
  }
  return union;
}

/** -1, 0, 1 for semantic versions (pseudo-versions compare by their base and timestamp). */
function compareVersions(a, b) {
  const parse = (v) => /^v(\d+)\.(\d+)\.(\d+)(.*)$/.exec(v);
  const [pa, pb] = [parse(a), parse(b)];
  if (!pa || !pb) return a === b ? 0 : a < b ? -1 : 1;
  for (let i = 1; i <= 3; i++) if (Number(pa[i]) !== Number(pb[i])) return Number(pa[i]) < Number(pb[i]) ? -1 : 1;
  if (pa[4] === pb[4]) return 0;
  if (pa[4] === '') return 1;
  if (pb[4] === '') return -1;
  return pa[4] < pb[4] ? -1 : 1;
}

switch (command) {
  case 'hosts': {
    const hosts = [];
    for (const name of args) {
      const host = hostOf(name);
      if (!hosts.includes(host)) hosts.push(host);
    }
    console.log(hosts.join('\n'));
    break;
  }
  case 'members':
    console.log(members(args[0]).join('\n'));
    break;
  case 'spec':
    console.log(JSON.stringify(Object.fromEntries(members(args[0]).map((n) => [n, components[n]]))));
    break;
  case 'replaces':
    for (const [old, { to }] of groupReplaces(args[0], stdinMembers())) console.log(`-replace=${old}=${to}`);
    break;
  case 'changes': {
    const list = stdinMembers();
    const replaced = groupReplaces(args[0], list);
    const selected = new Map(
      (process.env.GROUP_LIST ?? '')
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split(' ')),
    );
    let lowered = false;
    for (const { name, requires, replaces } of list) {
      for (const r of requires) {
        const own = replaces.get(r.Path)?.split('@')[1] ?? r.Version;
        const got = replaced.get(r.Path)?.to.split('@')[1] ?? selected.get(r.Path);
        if (!got || got === own) continue;
        const lower = compareVersions(got, own) < 0;
        lowered ||= lower;
        console.log(`${name}: ${r.Path} ${own} -> ${got}${lower ? ' (LOWER than its go.mod)' : ''}`);
      }
    }
    if (lowered) process.exit(3);
    break;
  }
  default:
    fail('usage: group.mjs hosts|members|spec|replaces|changes ...');
}
