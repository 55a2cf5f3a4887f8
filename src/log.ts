/**
 * The root logger. Created once by `main` and passed down as child loggers; secrets that could
 * reach a log line through request headers or objects are redacted.
 */
import { pino, type Logger, type LevelWithSilent } from 'pino';

export const REDACTED_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'headers.authorization',
  '*.headers.authorization',
  '*.password',
  '*.token',
  '*.auth',
  '*.dockerconfigjson',
  '*[".dockerconfigjson"]',
  '*.privateKey',
  '*.key',
];

export function createLogger(level: LevelWithSilent, destination?: NodeJS.WritableStream): Logger {
  return pino(
    {
      name: 'kmm-preflight',
      level,
      redact: { paths: REDACTED_PATHS, censor: '[REDACTED]' },
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
