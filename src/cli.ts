#!/usr/bin/env node
/**
 * The `kmm-preflight` command: `check` validates Module manifests offline; `serve` runs the API
 * server (the same as `npm start`).
 */
import { runCheck } from './check/check-command.ts';

const USAGE = `Usage: kmm-preflight <command> [options]

Commands:
  check    validate KMM Module manifests against a kernel or an OpenShift release, without a cluster
  serve    run the API server (see README.md)

Run "kmm-preflight <command> --help" for the options of a command.`;

async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'check':
      return runCheck(rest, { stdout: process.stdout, stderr: process.stderr });
    case 'serve': {
      process.argv = [process.argv[0]!, process.argv[1]!, ...rest];
      await import('./main.ts');
      return -1;
    }
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(`${USAGE}\n`);
      return 0;
    default:
      process.stderr.write(`kmm-preflight: ${command ? `unknown command "${command}"` : 'no command given'}; see --help.\n`);
      return 2;
  }
}

const code = await main(process.argv.slice(2));
if (code >= 0) process.exitCode = code;
