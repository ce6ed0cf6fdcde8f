/**
 * The shared log of a direct I/O session (src/dataplane/fuse/direct-log.ts): entries come back in the order
 * they were appended, a writer never overwrites what the main thread has not applied, a reader that fell a
 * whole log behind is told so instead of reading a newer entry as an old one, and the gate lets direct writes
 * in only while the session is LIVE.
 */
import { describe, expect, it } from 'vitest';
import { DirectLog, RENEW_POSITION, SessionState } from '../../src/dataplane/fuse/direct-log.js';

describe('direct I/O log', () => {
  it('returns entries in append order, with what they say and who wrote them', () => {
    const log = DirectLog.create(8);
    expect(log.append(3, 5, true, false, undefined)).toBe(true);
    expect(log.append(7, 9, false, true, undefined)).toBe(true);
    expect(log.tail).toBe(2);
    expect(log.read(0)).toEqual({ first: 3, end: 5, toHead: true, fromMain: false });
    expect(log.read(1)).toEqual({ first: 7, end: 9, toHead: false, fromMain: true });
    expect(log.read(2)).toBe('pending');
  });

  it('a full log refuses (or waits) until the main thread marks entries applied', () => {
    const log = DirectLog.create(4);
    for (let i = 0; i < 4; i++) expect(log.append(i, i + 1, true, false, undefined)).toBe(true);
    expect(log.append(9, 10, true, false, undefined)).toBe(false);
    let waits = 0;
    expect(
      log.append(9, 10, true, false, () => {
        waits++;
        if (waits === 2) log.markConsumed(2);
        return true;
      }),
    ).toBe(true);
    expect(waits).toBe(2);
    expect(log.read(4)).toEqual({ first: 9, end: 10, toHead: true, fromMain: false });
  });

  it('a reader a whole log behind finds its entry overwritten, not a newer one in its place', () => {
    const log = DirectLog.create(4);
    for (let i = 0; i < 4; i++) log.append(i, i + 1, true, false, undefined);
    log.markConsumed(4);
    log.append(100, 101, true, false, undefined);
    expect(log.read(0)).toBe('overwritten');
    expect(log.read(4)).toEqual({ first: 100, end: 101, toHead: true, fromMain: false });
  });

  it('a reader a whole log behind finds its entry overwritten while a writer is rewriting its slot, not a torn mix', () => {
    const log = DirectLog.create(4);
    for (let i = 0; i < 4; i++) log.append(i, i + 1, true, false, undefined);
    log.markConsumed(4);
    // A writer reserved position 4 (slot 0) and has stored its first block, but not yet published the slot.
    Atomics.store(log.header, 2, 5);
    const firsts = new Float64Array(log.buffer, 16 * 4, 4);
    firsts[0] = 100;
    expect(log.read(0)).toBe('overwritten');
    expect(log.read(1)).toEqual({ first: 1, end: 2, toHead: true, fromMain: false });
  });

  it('asks the main thread to drain once the log is half full, and once only until it has', () => {
    const log = DirectLog.create(8);
    for (let i = 0; i < 3; i++) log.append(i, i + 1, true, false, undefined);
    expect(log.shouldAskForDrain()).toBe(false);
    log.append(3, 4, true, false, undefined);
    expect(log.shouldAskForDrain()).toBe(true);
    expect(log.shouldAskForDrain()).toBe(false);
    log.markConsumed(4);
    for (let i = 4; i < 8; i++) log.append(i, i + 1, true, false, undefined);
    expect(log.shouldAskForDrain()).toBe(true);
  });

  it('lets direct writes through the gate only while LIVE, and the main thread waits for those inside', () => {
    const log = DirectLog.create(4);
    expect(log.enter()).toBe(true);
    log.setState(SessionState.PAUSED);
    expect(log.enter()).toBe(false);
    let drains = 0;
    // One writer is still inside: waiting drains meanwhile, and ends when it leaves.
    log.waitForWriters(() => {
      drains++;
      if (drains === 2) log.leave();
    });
    expect(drains).toBe(2);
    log.setState(SessionState.ENDED);
    expect(log.enter()).toBe(false);
    log.setState(SessionState.LIVE);
    expect(log.enter()).toBe(true);
  });

  it('views of the same shared buffer in another place see the same entries and state', () => {
    const log = DirectLog.create(4);
    const other = new DirectLog(log.buffer);
    log.append(1, 2, false, true, undefined);
    expect(other.read(0)).toEqual({ first: 1, end: 2, toHead: false, fromMain: true });
    other.setState(SessionState.ENDED);
    expect(log.state).toBe(SessionState.ENDED);
  });

  it('stops appending when the positions of a session run out (it is renewed then)', () => {
    const log = DirectLog.create(4);
    Atomics.store(log.header, 2, RENEW_POSITION);
    Atomics.store(log.header, 3, RENEW_POSITION);
    expect(log.append(0, 1, true, false, undefined)).toBe(false);
  });
});
