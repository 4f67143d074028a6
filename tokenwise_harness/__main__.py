from tokenwise_harness.cli import console_main

console_main()
