/**
 * Progress of long work: a cli-progress bar (bytes done/total, rate, ETA) on a TTY, a plain line every few
 * seconds otherwise, nothing at all for --quiet. Always on stderr: stdout is for the summary.
 */
import cliProgress from 'cli-progress';
import { formatBytes } from './units.js';

export interface Progress {
  start(label: string, totalBytes: number): void;
  add(bytes: number): void;
  stop(): void;
}

export function createProgress(mode: 'auto' | 'quiet' = 'auto', stream: NodeJS.WriteStream = process.stderr): Progress {
  if (mode === 'quiet') return { start() {}, add() {}, stop() {} };
  if (stream.isTTY) return barProgress(stream);
  return lineProgress(stream);
}

function barProgress(stream: NodeJS.WriteStream): Progress {
  let bar: cliProgress.SingleBar | undefined;
  let done = 0;
  let started = 0;
  return {
    start(label, total) {
      done = 0;
      started = Date.now();
      bar = new cliProgress.SingleBar(
        {
          stream,
          format: `${label} [{bar}] {percentage}% | {doneBytes} / {totalBytes} | {rate}/s | ETA {eta_formatted}`,
          hideCursor: true,
          etaBuffer: 50,
        },
        cliProgress.Presets.shades_classic,
      );
      bar.start(Math.max(total, 1), 0, {
        doneBytes: formatBytes(0),
        totalBytes: formatBytes(total),
        rate: formatBytes(0),
      });
    },
    add(bytes) {
      done += bytes;
      const seconds = Math.max((Date.now() - started) / 1000, 0.001);
      bar?.increment(bytes, { doneBytes: formatBytes(done), rate: formatBytes(done / seconds) });
    },
    stop() {
      bar?.stop();
      bar = undefined;
    },
  };
}

function lineProgress(stream: NodeJS.WriteStream, everyMs = 5000): Progress {
  let label = '';
  let total = 0;
  let done = 0;
  let started = 0;
  let last = 0;
  const line = () => {
    const seconds = Math.max((Date.now() - started) / 1000, 0.001);
    const rate = done / seconds;
    const pct = total > 0 ? ((100 * done) / total).toFixed(1) : '100.0';
    const eta = rate > 0 && total > done ? `, ETA ${Math.ceil((total - done) / rate)} s` : '';
    stream.write(`${label}: ${formatBytes(done)} of ${formatBytes(total)} (${pct}%), ${formatBytes(rate)}/s${eta}\n`);
  };
  return {
    start(l, t) {
      label = l;
      total = t;
      done = 0;
      started = last = Date.now();
    },
    add(bytes) {
      done += bytes;
      const now = Date.now();
      if (now - last >= everyMs) {
        last = now;
        line();
      }
    },
    stop() {
      if (started) line();
      started = 0;
    },
  };
}
