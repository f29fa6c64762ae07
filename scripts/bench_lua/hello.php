<?php
// Benchmark case "hello": the smallest response (the same as hello.lua).
echo "Hello, world!";
