/** Structured JSON logs (pino): one line a request at info, details at debug; secrets never written. */
import { pino, destination, stdTimeFunctions, type DestinationStream, type Logger } from 'pino';
import type { LogLevel } from './config.js';

export type { Logger };

/** Paths pino blanks out wherever they occur in a logged object. */
const REDACT = [
  'secrets',
  '*.secrets',
  'request.secrets',
  'req.secrets',
  '*.*.secrets',
  'securityToken',
  '*.securityToken',
];

export function createLogger(level: LogLevel, stream?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { component: 'cbt-csi' },
      timestamp: stdTimeFunctions.isoTime,
      redact: { paths: REDACT, censor: '[REDACTED]' },
      formatters: { level: (label) => ({ level: label }) },
    },
    stream ?? destination({ dest: 1, sync: false }),
  );
}
