/**
 * `npm start`: runs the kmm-preflight API server stand-alone on the embedded storage, creating a
 * development PKI and kubeconfig under certs/ on first start.
 */
import { ConfigError, loadConfig } from './config.ts';
import { createLogger } from './log.ts';
import { startServer } from './server/server.ts';

async function main(): Promise<number> {
  let config;
  try {
    config = loadConfig(process.argv.slice(2), process.env, process.cwd());
  } catch (err) {
    const message = err instanceof ConfigError ? err.message : (err as Error).message;
    process.stderr.write(`kmm-preflight: ${message}\n`);
    return 2;
  }
  const logger = createLogger(config.logLevel);
  let server;
  try {
    server = await startServer(config, logger);
  } catch (err) {
    logger.fatal({ err }, 'the server could not start');
    logger.flush();
    return 1;
  }
  const stop = (signal: string) => {
    logger.info({ signal }, 'shutting down');
    void server.close().then(
      () => {
        logger.flush();
        process.exit(0);
      },
      (err: unknown) => {
        logger.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  return -1;
}

const code = await main();
if (code >= 0) process.exitCode = code;
